"""The sans-IO SMTP server core: bytes in, typed events out; replies in, bytes out.

The driver (``server.py``) feeds received bytes with ``receive_data()``, pulls events with
``next_event()`` and answers each with ``send(reply)``, which returns the bytes to write.
The core owns the receive buffer, every limit, and every protocol question: is this
command legal now, is this a valid path, where does DATA end, is AUTH allowed before TLS.
The session answers policy questions (does this user exist, may this sender send).

Event protocol:

- ``next_event()`` returns an ``Event`` or ``NEED_DATA`` (more bytes are needed; the driver
  flushes its output, reads, and calls ``receive_data()``: RFC 2920 §3.2).
- Every event gets exactly one ``send()`` before the next ``next_event()``, except
  ``DataChunk`` and ``ConnectionClosed``, which get none. Calling ``next_event()`` while a
  reply is owed is a programming error (``RuntimeError``), as is sending a reply that does
  not fit the event (a 354 to RCPT, a 221 to NOOP).
- ``Bdat`` gets a ``send()`` too, but a 2xx there writes nothing (RFC 3030 §2: the one reply
  to a BDAT comes after its chunk, as the reply to ``BdatEnd``); a 4xx/5xx refuses the chunk
  before it is read: the refusal is written, the chunk is consumed unread and the
  transaction ends.
- When the core refuses input itself it raises ``ProtocolError``; the driver must then
  ``send(exc.hint)`` (the core has counted the error) and close if ``hint.closes``.
- A 421 may be sent at any time (RFC 5321 §3.8): it closes. Any reply whose ``closes`` is
  true (221, 421, ``terminal=True``) moves the core to ``CLOSED``.
- Once ``CLOSED``, ``next_event()`` returns ``ConnectionClosed()`` and input is ignored.

Decisions:

- VRFY is emitted as ``Vrfy``; the session answers ``252 2.5.0`` (``replies.VRFY``), never
  confirming a user (RFC 5321 §3.5.3, §7.3).
- ``<Postmaster>`` (RFC 5321 §4.1.1.3) becomes ``postmaster@<hostname>`` so that every
  recipient downstream is ``local@domain``.
- Addresses in ``MailFrom``/``RcptTo`` are canonical (``mail.address``): domains as
  lower-case A-labels, local part as received.
- Errors: every refusal the core makes counts towards ``limits.errors`` except
  ``452 4.5.3 Too many recipients`` (RFC 5321 §4.5.3.1.10: clients must handle it by sending
  the rest later, so it is not a client error). The error after the budget is
  ``421 4.7.0 Too many errors``.
- A syntactically valid BDAT that is refused (sequence, TLS, authentication) still has its
  chunk consumed unread (RFC 3030 §2), so the bytes are never parsed as commands.

Invariants:
- Only CRLF ends a line (RFC 5321 §2.3.8). A bare CR or LF in a command line gets
  ``500 5.5.2`` and the connection closes; in DATA it refuses the message (``554 5.5.2``).
  DATA ends only at CRLF "." CRLF (RFC 5321 §4.1.1.4): no other byte sequence ends a
  message or starts a command (no SMTP smuggling).
- Unread input held by the core after ``next_event()`` returns ``NEED_DATA`` is shorter
  than ``limits.line_length``; an over-long line is discarded as it arrives. Message
  content is never held whole: it leaves as ``DataChunk`` pieces of at most
  ``DATA_CHUNK_SIZE`` bytes, and not at all once the message is over ``message_size``.
- Bytes read before the 220 to STARTTLS are never parsed: ``start_tls()`` returns and
  forgets them, with the EHLO state and the transaction (RFC 3207 §4.2).
- MAIL, RCPT, DATA, BDAT and AUTH are refused with ``530 5.7.0`` until TLS when TLS is
  required; AUTH is accepted only on ``Role.SUBMISSION`` over TLS and only once; on
  ``Role.SUBMISSION`` MAIL needs AUTH first.
- State changes only through ``TRANSITIONS`` (on our replies) and the command table
  ``ALLOWED``: what is legal is data, in one place.
- The core imports no asyncio, ssl, socket, logging or storage code and does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from types import MappingProxyType

from postkeep.mail import address
from postkeep.sasl.mechanisms import Credentials, plain_credentials
from postkeep.smtp import replies
from postkeep.smtp.replies import Reply

#: Largest DataChunk the core emits.
DATA_CHUNK_SIZE = 64 * 1024
#: RFC 5321 §4.5.3.1.4: the smallest command line length a server must accept.
MIN_LINE_LENGTH = 512
#: A driver bug guard: unread input beyond this means the driver stopped draining.
MAX_UNREAD = 4 * 1024 * 1024
#: Longest decimal number accepted for SIZE= and BDAT (20 digits hold any 64-bit size).
MAX_NUMBER_DIGITS = 20
#: RFC 4954 §6 lists these as the mechanisms we advertise (``AUTH PLAIN LOGIN``).
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
#: Cross-protocol attempts (a browser or proxy talking to port 25): close at once, as
#: Postfix's ``smtpd_forbidden_commands`` does.
FORBIDDEN_VERBS = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT"})


class Role(Enum):
    MX = auto()  # port 25: mail from other servers, no AUTH
    SUBMISSION = auto()  # ports 587/465: mail from our users, AUTH required (RFC 6409)


@dataclass(frozen=True, slots=True)
class Limits:
    line_length: int = 4096  # incl. CRLF (RFC 5321 §4.5.3.1.4: at least 512)
    message_size: int = 52_428_800  # advertised as SIZE (RFC 1870), enforced while reading
    recipients: int = 100  # RFC 5321 §4.5.3.1.8: at least 100
    errors: int = 10  # errors allowed; the next one gets 421 4.7.0 and a close
    commands: int = 10_000  # command lines per connection

    def __post_init__(self) -> None:
        if self.line_length < MIN_LINE_LENGTH:
            raise ValueError(f"line_length must be at least {MIN_LINE_LENGTH} (RFC 5321)")
        if min(self.message_size, self.recipients, self.errors, self.commands) < 1:
            raise ValueError("SMTP limits must be positive")


class State(Enum):
    INITIAL = auto()  # before the greeting
    GREETED = auto()  # greeting sent (or TLS just started): expects EHLO/HELO
    READY = auto()  # after EHLO/HELO, no transaction
    MAIL = auto()  # MAIL accepted, no recipient yet
    RCPT = auto()  # at least one recipient accepted
    DATA = auto()  # after 354: reading message content up to CRLF.CRLF
    BDAT = auto()  # reading a BDAT chunk
    CHUNKING = auto()  # between BDAT chunks of one transaction
    AUTH = auto()  # after 334: expects a SASL response line
    TLS_PENDING = auto()  # after 220 to STARTTLS: only start_tls() is legal
    CLOSED = auto()


class NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


# -- events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything ``next_event()`` returns."""


@dataclass(frozen=True, slots=True)
class Hello(Event):
    name: str
    extended: bool  # EHLO (True) or HELO


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    pass


@dataclass(frozen=True, slots=True)
class AuthStart(Event):
    mechanism: str  # upper-case, one of AUTH_MECHANISMS
    initial: bytes | None  # RFC 4954 §4: decoded initial response; "=" -> b""; absent -> None


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    data: bytes | None  # decoded response; None when the client cancelled with "*"


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    address: str  # canonical, without <>; "" for the null reverse-path
    params: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    address: str
    params: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Data(Event):
    pass


@dataclass(frozen=True, slots=True)
class Bdat(Event):
    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    data: bytes  # no reply


@dataclass(frozen=True, slots=True)
class DataEnd(Event):
    pass


@dataclass(frozen=True, slots=True)
class BdatEnd(Event):
    last: bool


@dataclass(frozen=True, slots=True)
class DataAbort(Event):
    reply: Reply  # the session discards the spool and sends exactly this


@dataclass(frozen=True, slots=True)
class Rset(Event):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Event):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    argument: str


@dataclass(frozen=True, slots=True)
class Help(Event):
    pass


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed (EOF) or the connection is over; no reply. A message being
    received is abandoned."""


class ProtocolError(Exception):
    """The core refused input; ``hint`` is the reply the driver must ``send()``.

    ``leaked``: the credentials of an ``AUTH PLAIN <initial-response>`` refused because TLS
    had not started. They crossed the wire in plaintext; the driver may check them to warn
    the account's owner (``auth/exposure.py``). The reply does not depend on them."""

    def __init__(self, hint: Reply, leaked: Credentials | None = None) -> None:
        super().__init__(f"{hint.code} {hint.enhanced or ''} {' '.join(hint.lines)}".strip())
        self.hint = hint
        self.leaked = leaked


# -- the tables --------------------------------------------------------------------------
class Verb(Enum):
    HELO = auto()
    EHLO = auto()
    STARTTLS = auto()
    AUTH = auto()
    MAIL = auto()
    RCPT = auto()
    DATA = auto()
    BDAT = auto()
    RSET = auto()
    NOOP = auto()
    QUIT = auto()
    VRFY = auto()
    HELP = auto()
    EXPN = auto()


_VERBS = {verb.name: verb for verb in Verb}


class Outcome(Enum):
    """What a reply means to the state machine."""

    POSITIVE = auto()  # 2xx other than below
    START_INPUT = auto()  # 354 (RFC 5321 §4.1.1.4)
    CHALLENGE = auto()  # 334 (RFC 4954 §4)
    AUTHENTICATED = auto()  # 235 (RFC 4954 §4)
    CLOSING = auto()  # 221 (RFC 5321 §4.1.1.10)
    NEGATIVE = auto()  # 4xx/5xx


def outcome_of(reply: Reply) -> Outcome | None:
    special = {354: Outcome.START_INPUT, 334: Outcome.CHALLENGE,
               235: Outcome.AUTHENTICATED, 221: Outcome.CLOSING}
    if reply.code in special:
        return special[reply.code]
    if 200 <= reply.code < 300:
        return Outcome.POSITIVE
    if reply.code >= 400:
        return Outcome.NEGATIVE
    return None  # any other 3xx fits no SMTP server event


COMMAND_STATES = frozenset(
    {State.GREETED, State.READY, State.MAIL, State.RCPT, State.CHUNKING}
)
TRANSACTION_STATES = frozenset(
    {State.MAIL, State.RCPT, State.DATA, State.BDAT, State.CHUNKING}
)
_POS, _NEG = Outcome.POSITIVE, Outcome.NEGATIVE
#: An event class, or (BdatEnd, last): the end of a last chunk moves elsewhere.
EventKind = type[Event] | tuple[type[Event], bool]

#: (state, event kind, outcome of our reply) -> next state. A missing key means the reply
#: does not fit the event (RuntimeError). Leaving TRANSACTION_STATES clears the transaction.
TRANSITIONS: dict[tuple[State, EventKind, Outcome], State] = {
    # RFC 5321 §4.1.4: EHLO/HELO may come at any time and reset the transaction.
    **{(s, Hello, _POS): State.READY for s in COMMAND_STATES},
    **{(s, Hello, _NEG): s for s in COMMAND_STATES},
    # RFC 5321 §4.1.1.5: RSET clears the transaction, not the EHLO state.
    (State.GREETED, Rset, _POS): State.GREETED,
    **{(s, Rset, _POS): State.READY for s in COMMAND_STATES - {State.GREETED}},
    **{(s, k, o): s for s in COMMAND_STATES for k in (Noop, Vrfy, Help) for o in (_POS, _NEG)},
    **{(s, Quit, Outcome.CLOSING): State.CLOSED for s in COMMAND_STATES},
    # RFC 3207 §4: 220 -> TLS negotiation; 454 -> carry on in plaintext.
    (State.READY, StartTls, _POS): State.TLS_PENDING,
    (State.READY, StartTls, _NEG): State.READY,
    # RFC 4954 §4: 334 continues the exchange, 235 ends it successfully, else it failed.
    (State.READY, AuthStart, Outcome.CHALLENGE): State.AUTH,
    (State.READY, AuthStart, Outcome.AUTHENTICATED): State.READY,
    (State.READY, AuthStart, _NEG): State.READY,
    (State.AUTH, AuthResponse, Outcome.CHALLENGE): State.AUTH,
    (State.AUTH, AuthResponse, Outcome.AUTHENTICATED): State.READY,
    (State.AUTH, AuthResponse, _NEG): State.READY,
    # RFC 5321 §4.1.1.2-3: the transaction advances only on 2xx.
    (State.READY, MailFrom, _POS): State.MAIL,
    (State.READY, MailFrom, _NEG): State.READY,
    (State.MAIL, RcptTo, _POS): State.RCPT,
    (State.MAIL, RcptTo, _NEG): State.MAIL,
    (State.RCPT, RcptTo, _POS): State.RCPT,
    (State.RCPT, RcptTo, _NEG): State.RCPT,
    (State.RCPT, Data, Outcome.START_INPUT): State.DATA,
    (State.RCPT, Data, _NEG): State.RCPT,
    # RFC 5321 §4.1.1.4: whatever the final reply, the transaction is over.
    (State.DATA, DataEnd, _POS): State.READY,
    (State.DATA, DataEnd, _NEG): State.READY,
    (State.DATA, DataAbort, _NEG): State.READY,
    # RFC 3030 §2: a refused chunk fails the transaction; its bytes are skipped.
    (State.RCPT, Bdat, _POS): State.BDAT,
    (State.CHUNKING, Bdat, _POS): State.BDAT,
    (State.RCPT, Bdat, _NEG): State.READY,
    (State.CHUNKING, Bdat, _NEG): State.READY,
    (State.BDAT, (BdatEnd, False), _POS): State.CHUNKING,
    (State.BDAT, (BdatEnd, False), _NEG): State.READY,
    (State.BDAT, (BdatEnd, True), _POS): State.READY,
    (State.BDAT, (BdatEnd, True), _NEG): State.READY,
    (State.BDAT, DataAbort, _NEG): State.READY,
}

#: Where each command is legal. RFC 5321 §4.1.4 (order of commands), RFC 3030 §2 (BDAT),
#: RFC 3207 §4 and RFC 4954 §4 (not during a transaction).
ALLOWED: dict[Verb, frozenset[State]] = {
    Verb.HELO: COMMAND_STATES,
    Verb.EHLO: COMMAND_STATES,
    Verb.STARTTLS: frozenset({State.READY}),
    Verb.AUTH: frozenset({State.READY}),
    Verb.MAIL: frozenset({State.READY}),
    Verb.RCPT: frozenset({State.MAIL, State.RCPT}),
    Verb.DATA: frozenset({State.RCPT}),
    Verb.BDAT: frozenset({State.RCPT, State.CHUNKING}),
    Verb.RSET: COMMAND_STATES,
    Verb.NOOP: COMMAND_STATES,
    Verb.QUIT: COMMAND_STATES,
    Verb.VRFY: COMMAND_STATES,
    Verb.HELP: COMMAND_STATES,
    Verb.EXPN: frozenset(),  # RFC 5321 §3.5.2: may be disabled (502)
}

#: The refusal for a command outside ``ALLOWED``; (verb, None) is the default for the verb.
OUT_OF_SEQUENCE: dict[tuple[Verb, State | None], Reply] = {
    (Verb.STARTTLS, State.GREETED): replies.HELLO_FIRST,
    (Verb.STARTTLS, None): replies.IN_TRANSACTION,
    (Verb.AUTH, State.GREETED): replies.HELLO_FIRST,
    (Verb.AUTH, None): replies.AUTH_IN_TRANSACTION,  # RFC 4954 §4
    (Verb.MAIL, State.GREETED): replies.HELLO_FIRST,
    (Verb.MAIL, None): replies.NESTED_MAIL,
    (Verb.RCPT, State.CHUNKING): replies.RCPT_AFTER_BDAT,
    (Verb.RCPT, None): replies.MAIL_FIRST,
    (Verb.DATA, State.MAIL): replies.NO_VALID_RECIPIENTS,  # RFC 5321 §3.3
    (Verb.DATA, State.CHUNKING): replies.DATA_AFTER_BDAT,  # RFC 3030 §2
    (Verb.DATA, None): replies.MAIL_FIRST,
    (Verb.BDAT, State.MAIL): replies.NO_VALID_RECIPIENTS,
    (Verb.BDAT, None): replies.MAIL_FIRST,
    (Verb.EXPN, None): replies.NOT_IMPLEMENTED,
}


class Fact(Enum):
    """Connection facts the guards test."""

    TLS_REQUIRED_NOT_ACTIVE = auto()
    NOT_TLS = auto()
    TLS_ACTIVE = auto()
    TLS_NOT_OFFERED = auto()
    MX_ROLE = auto()
    AUTHENTICATED = auto()
    SUBMISSION_NOT_AUTHENTICATED = auto()
    HELO_NOT_EHLO = auto()


#: Marks the per-connection "STARTTLS first" reply (its text comes from the driver).
_STARTTLS_HINT = replies.reply(530, "5.7.0", "<starttls hint>")

#: Checked in order before the sequence check: the first fact that holds refuses.
GUARDS: dict[Verb, tuple[tuple[Fact, Reply], ...]] = {
    # RFC 3207 §4: STARTTLS only once, only where offered.
    Verb.STARTTLS: (
        (Fact.TLS_ACTIVE, replies.TLS_ALREADY_ACTIVE),
        (Fact.TLS_NOT_OFFERED, replies.TLS_NOT_OFFERED),
    ),
    # RFC 4954 §4 (no plaintext passwords without TLS), RFC 6409: AUTH only for submission,
    # only over TLS, only once.
    Verb.AUTH: (
        (Fact.MX_ROLE, replies.AUTH_ONLY_ON_SUBMISSION),
        (Fact.TLS_REQUIRED_NOT_ACTIVE, _STARTTLS_HINT),
        (Fact.NOT_TLS, replies.ENCRYPTION_REQUIRED),  # RFC 4954 §6: 538 5.7.11
        (Fact.AUTHENTICATED, replies.ALREADY_AUTHENTICATED),
        (Fact.HELO_NOT_EHLO, replies.EHLO_REQUIRED),
    ),
    Verb.MAIL: (
        (Fact.TLS_REQUIRED_NOT_ACTIVE, _STARTTLS_HINT),
        (Fact.SUBMISSION_NOT_AUTHENTICATED, replies.AUTH_REQUIRED),  # RFC 6409 §4.3
    ),
    Verb.RCPT: (
        (Fact.TLS_REQUIRED_NOT_ACTIVE, _STARTTLS_HINT),
        (Fact.SUBMISSION_NOT_AUTHENTICATED, replies.AUTH_REQUIRED),
    ),
    Verb.DATA: (
        (Fact.TLS_REQUIRED_NOT_ACTIVE, _STARTTLS_HINT),
        (Fact.SUBMISSION_NOT_AUTHENTICATED, replies.AUTH_REQUIRED),
    ),
    Verb.BDAT: (
        (Fact.TLS_REQUIRED_NOT_ACTIVE, _STARTTLS_HINT),
        (Fact.SUBMISSION_NOT_AUTHENTICATED, replies.AUTH_REQUIRED),
        (Fact.HELO_NOT_EHLO, replies.EHLO_REQUIRED),  # RFC 3030 §2: CHUNKING needs EHLO
    ),
}

#: Events that need no reply.
_NO_REPLY = (DataChunk, ConnectionClosed)

_LINE_END = re.compile(rb"[\r\n]")
# In DATA content: a CR not followed by LF, or an LF not preceded by CR.
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 5321 §4.1.2 esmtp-keyword
# RFC 5321 §4.1.2 esmtp-value = 1*(%d33-60 / %d62-126); RFC 6531 §3.3 adds UTF8-non-ascii.
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+")
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_NUMBER_DIGITS}}}")
_HELLO_NAME = re.compile(r"[\x21-\x7e]+")
_SASL_MECH = re.compile(r"[A-Za-z0-9_-]{1,20}")  # RFC 4422 §3.1 mechanism name


class _Refused(Exception):
    """Internal: a command refused with ``reply`` (turned into ProtocolError)."""

    def __init__(self, reply: Reply, *, counts: bool = True) -> None:
        super().__init__()
        self.reply = reply
        self.counts = counts
        self.leaked: Credentials | None = None


@dataclass(slots=True)
class _Transaction:
    utf8: bool = False  # MAIL had SMTPUTF8 (RFC 6531 §3.4)
    recipients: int = 0  # accepted recipients
    size: int = 0  # content bytes received so far (DATA after unstuffing, or BDAT)
    too_big: bool = False


@dataclass(slots=True)
class _DataReader:
    """Where we are in DATA content (RFC 5321 §4.1.1.4, §4.5.2)."""

    at_line_start: bool = True
    bare: bool = False  # a bare CR or LF was seen: the message will be refused
    ended: bool = False  # CRLF.CRLF consumed; the end event is still to be returned


class SmtpServer:
    """One SMTP server connection's protocol state. See the module docstring."""

    def __init__(
        self,
        *,
        role: Role,
        limits: Limits,
        hostname: str,
        tls_active: bool,
        tls_offered: bool,
        require_tls: bool,
        starttls_hint: str = "Must issue a STARTTLS command first",
    ) -> None:
        self.role = role
        self.limits = limits
        self.hostname = hostname
        self._tls_active = tls_active
        self._tls_offered = tls_offered
        self._require_tls = require_tls
        self._starttls_reply = replies.starttls_required(starttls_hint)
        self._postmaster_domain = hostname
        self._state = State.INITIAL
        self._authenticated = False
        self._hello: Hello | None = None
        self._txn = _Transaction()
        self._buf = bytearray()
        self._pos = 0  # bytes before this offset in _buf are consumed
        self._eof = False
        self._discarding = False  # inside an over-long line, already refused
        self._skip = 0  # bytes of a refused BDAT chunk still to be consumed unread
        self._chunk_left = 0  # bytes of the current BDAT chunk still to come
        self._chunk_last = False
        self._data = _DataReader()
        self._owed: Event | Reply | None = None  # what the next send() answers
        self._after_hint = State.INITIAL  # state once a ProtocolError hint is sent
        self._errors = 0
        self._commands = 0
        self._parsers: dict[Verb, Callable[[str], Event]] = {
            Verb.HELO: lambda arg: self._parse_hello(arg, extended=False),
            Verb.EHLO: lambda arg: self._parse_hello(arg, extended=True),
            Verb.STARTTLS: lambda arg: self._no_argument(arg, StartTls()),
            Verb.AUTH: self._parse_auth,
            Verb.MAIL: self._parse_mail,
            Verb.RCPT: self._parse_rcpt,
            Verb.DATA: lambda arg: self._no_argument(arg, Data()),
            Verb.RSET: lambda arg: self._no_argument(arg, Rset()),
            Verb.NOOP: lambda arg: Noop(),  # RFC 5321 §4.1.1.9: NOOP [SP String]
            Verb.QUIT: lambda arg: self._no_argument(arg, Quit()),
            Verb.VRFY: self._parse_vrfy,
            Verb.HELP: lambda arg: Help(),  # RFC 5321 §4.1.1.8: HELP [SP String]
        }

    # -- read-only views -----------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def buffered(self) -> int:
        """Unread input bytes held by the core (for tests and diagnostics)."""
        return len(self._buf) - self._pos

    # -- output --------------------------------------------------------------------------
    def greet(self) -> bytes:
        """The 220 greeting (RFC 5321 §3.1). INITIAL -> GREETED."""
        if self._state is not State.INITIAL:
            raise RuntimeError("greet() is only legal once, first")
        self._state = State.GREETED
        return replies.greeting(self.hostname).render()

    def hello_reply(self, text: str = "") -> Reply:
        """The 250 reply to the pending EHLO/HELO, with the capabilities valid now.

        Only legal while a ``Hello`` event is owed its reply (``RuntimeError`` otherwise):
        the list depends on EHLO vs HELO and on the TLS and AUTH state at that moment.
        """
        if not isinstance(self._owed, Hello):
            raise RuntimeError("hello_reply() answers a pending Hello event")
        if not self._owed.extended:
            return replies.hello(self.hostname, text)  # RFC 5321 §4.1.1.1: HELO, no list
        caps = [
            "PIPELINING",  # RFC 2920
            f"SIZE {self.limits.message_size}",  # RFC 1870 §4
            "8BITMIME",  # RFC 6152
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "SMTPUTF8",  # RFC 6531
            "CHUNKING",  # RFC 3030
        ]
        if self._tls_offered and not self._tls_active:
            caps.append("STARTTLS")  # RFC 3207 §4.2: not after TLS has started
        if self.role is Role.SUBMISSION and self._tls_active and not self._authenticated:
            caps.append("AUTH " + " ".join(AUTH_MECHANISMS))  # RFC 4954 §3-4: only over TLS
        return replies.hello(self.hostname, text, tuple(caps))

    def send(self, reply: Reply) -> bytes:
        """Answer the owed event (or ProtocolError hint); returns the bytes to write."""
        if self._state is State.CLOSED:
            raise RuntimeError("the connection is closed")
        if reply.code == 421:  # RFC 5321 §3.8: the server may close with 421 at any time
            self._owed = None
            self._move(State.CLOSED)
            return reply.render()
        owed = self._owed
        if owed is None:
            raise RuntimeError("no reply is owed")
        if isinstance(owed, Reply):
            if reply != owed:
                raise RuntimeError("after a ProtocolError, send exactly its hint")
            self._owed = None
            self._move(State.CLOSED if reply.closes else self._after_hint)
            return reply.render()
        if isinstance(owed, DataAbort) and reply != owed.reply:
            raise RuntimeError("a DataAbort must be answered with its own reply")
        outcome = outcome_of(reply)
        kind: EventKind = (BdatEnd, owed.last) if isinstance(owed, BdatEnd) else type(owed)
        nxt = TRANSITIONS.get((self._state, kind, outcome)) if outcome else None
        if nxt is None:
            raise RuntimeError(f"reply {reply.code} does not fit {type(owed).__name__}")
        self._owed = None
        self._apply(owed, outcome, nxt if not reply.closes else State.CLOSED)
        if isinstance(owed, Bdat) and outcome is Outcome.POSITIVE:
            return b""  # RFC 3030 §2: the BDAT reply comes after its chunk (BdatEnd)
        return reply.render()

    def _apply(self, event: Event, outcome: Outcome | None, nxt: State) -> None:
        """Side effects of a legal reply, then the state change."""
        if isinstance(event, Hello) and outcome is Outcome.POSITIVE:
            self._hello = event
        elif outcome is Outcome.AUTHENTICATED:
            self._authenticated = True
        elif isinstance(event, MailFrom) and outcome is Outcome.POSITIVE:
            self._txn = _Transaction(utf8="SMTPUTF8" in event.params)
        elif isinstance(event, RcptTo) and outcome is Outcome.POSITIVE:
            self._txn.recipients += 1
        elif isinstance(event, Data) and outcome is Outcome.START_INPUT:
            self._data = _DataReader()
        elif isinstance(event, Bdat):
            if outcome is Outcome.POSITIVE:
                self._chunk_left, self._chunk_last = event.size, event.last
            else:
                self._skip = event.size  # RFC 3030 §2: consume the refused chunk
        self._move(nxt)

    def _move(self, nxt: State) -> None:
        if nxt not in TRANSACTION_STATES:
            self._txn = _Transaction()
        if nxt is State.CLOSED:
            self._buf = bytearray()  # nothing after the end is ever parsed
            self._pos = 0
        self._state = nxt

    # -- input ---------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer received bytes; ``b""`` means the peer closed (EOF)."""
        if self._state is State.CLOSED:
            return
        if not data:
            self._eof = True
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if len(self._buf) + len(data) > MAX_UNREAD:
            raise RuntimeError("receive_data() without draining next_event() first")
        self._buf += data

    def start_tls(self) -> bytes:
        """After ``send(READY_FOR_TLS)``: drop and return every unread byte, forget EHLO.

        RFC 3207 §4.2: the server MUST discard any knowledge obtained from the client
        before the TLS negotiation; bytes that arrived before the handshake were sent
        before our 220 and are never parsed (CVE-2011-0411).
        """
        if self._state is not State.TLS_PENDING:
            raise RuntimeError("start_tls() is only legal right after the 220 to STARTTLS")
        dropped = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        self._discarding = False
        self._skip = 0
        self._hello = None
        self._authenticated = False
        self._tls_active = True
        self._move(State.GREETED)
        return dropped

    def next_event(self) -> Event | NeedData:
        """The next event, ``NEED_DATA``, or ``ProtocolError`` (see the module docstring)."""
        if self._owed is not None:
            raise RuntimeError("next_event() called while a reply is owed: send() it first")
        if self._state is State.INITIAL:
            raise RuntimeError("greet() first")
        if self._state is State.TLS_PENDING:
            raise RuntimeError("start_tls() first")
        if self._state is State.CLOSED:
            return ConnectionClosed()
        if self._state is State.DATA:
            event = self._next_data_event()
        elif self._state is State.BDAT:
            event = self._next_chunk_event()
        else:
            event = self._next_command_event()
        if event is NEED_DATA:
            if self._eof:
                self._move(State.CLOSED)  # a message being received is abandoned
                return ConnectionClosed()
            return NEED_DATA
        if not isinstance(event, _NO_REPLY):
            self._owed = event
        return event

    # -- errors --------------------------------------------------------------------------
    def _refuse(self, reply: Reply, *, after: State, counts: bool = True) -> ProtocolError:
        """Record that ``reply`` is owed and return the ProtocolError to raise."""
        if counts and not reply.closes:
            self._errors += 1
            if self._errors > self.limits.errors:
                reply = replies.TOO_MANY_ERRORS
        self._owed = reply
        self._after_hint = after
        return ProtocolError(reply)

    # -- command lines -------------------------------------------------------------------
    def _read_line(self) -> bytes | NeedData:
        """The next CRLF-terminated line without its CRLF (RFC 5321 §2.3.8).

        Problems are reported in the order they appear in the byte stream, so the result
        does not depend on how the input was split: a line that has grown too long is
        refused before whatever ends it is looked at.
        """
        buf, limit = self._buf, self.limits.line_length
        while True:
            start = self._pos
            m = _LINE_END.search(buf, start)
            end = len(buf) if m is None else m.start()
            if end - start > limit - 2:  # no room left for the content and CRLF
                self._pos = end  # the excess is dropped, never buffered
                if not self._discarding:
                    self._discarding = True
                    raise self._refuse(replies.LINE_TOO_LONG, after=self._after_long_line())
            elif self._discarding:
                self._pos = end
            if m is None:
                return NEED_DATA
            if buf[end] == 0x0A or (end + 1 < len(buf) and buf[end + 1] != 0x0A):
                self._pos = len(buf)
                raise self._refuse(replies.BARE_LINE_ENDING, after=State.CLOSED)
            if end + 1 >= len(buf):
                return NEED_DATA  # a CR at the very end: wait for its LF
            self._pos = end + 2
            if self._discarding:
                self._discarding = False  # the over-long line ends here, already refused
                continue
            return bytes(buf[start:end])

    def _after_long_line(self) -> State:
        # RFC 4954 §4: an over-long line in an AUTH exchange ends the exchange.
        return State.READY if self._state is State.AUTH else self._state

    def _next_command_event(self) -> Event | NeedData:
        if self._skip:
            take = min(self._skip, len(self._buf) - self._pos)
            self._pos += take
            self._skip -= take
            if self._skip:
                return NEED_DATA
        line = self._read_line()
        if line is NEED_DATA:
            return NEED_DATA
        self._commands += 1
        if self._commands > self.limits.commands:
            raise self._refuse(replies.TOO_MANY_COMMANDS, after=State.CLOSED)
        if self._state is State.AUTH:
            return self._auth_response(line)
        try:
            return self._command(line)
        except _Refused as exc:
            error = self._refuse(exc.reply, after=self._state, counts=exc.counts)
            error.leaked = exc.leaked
            raise error from None

    def _command(self, line: bytes) -> Event:
        # RFC 5321 §2.4: verbs are case-insensitive; §4.1.1: verb [SP argument].
        verb_bytes, _, arg_bytes = line.partition(b" ")
        verb_text = verb_bytes.decode("latin-1").upper()
        if verb_text in FORBIDDEN_VERBS:
            raise _Refused(replies.NOT_SMTP)
        verb = _VERBS.get(verb_text)
        if verb is None:
            raise _Refused(replies.UNKNOWN_COMMAND)  # RFC 5321 §4.2.4: 500, not 502
        if verb is Verb.BDAT:
            return self._bdat(arg_bytes)
        try:
            self._check_allowed(verb)
        except _Refused as exc:
            if verb is Verb.AUTH and self._holds(Fact.TLS_REQUIRED_NOT_ACTIVE):
                exc.leaked = _leaked_plain(arg_bytes)
            raise
        try:
            arg = arg_bytes.decode("utf-8").rstrip(" ")
        except UnicodeDecodeError:
            # RFC 6531 §3.5 / §3.3: only valid UTF-8, and only in addresses.
            bad = verb in (Verb.MAIL, Verb.RCPT)
            raise _Refused(replies.NON_ASCII_ADDRESS if bad else replies.NOT_UTF8) from None
        return self._parsers[verb](arg)

    def _check_allowed(self, verb: Verb) -> None:
        for fact, refusal in GUARDS.get(verb, ()):
            if self._holds(fact):
                raise _Refused(self._starttls_reply if refusal is _STARTTLS_HINT else refusal)
        if self._state not in ALLOWED[verb]:
            raise _Refused(
                OUT_OF_SEQUENCE.get((verb, self._state))
                or OUT_OF_SEQUENCE.get((verb, None))
                or replies.HELLO_FIRST
            )

    def _holds(self, fact: Fact) -> bool:
        match fact:
            case Fact.TLS_REQUIRED_NOT_ACTIVE:
                return self._require_tls and not self._tls_active
            case Fact.NOT_TLS:
                return not self._tls_active
            case Fact.TLS_ACTIVE:
                return self._tls_active
            case Fact.TLS_NOT_OFFERED:
                return not self._tls_offered
            case Fact.MX_ROLE:
                return self.role is Role.MX
            case Fact.AUTHENTICATED:
                return self._authenticated
            case Fact.SUBMISSION_NOT_AUTHENTICATED:
                return self.role is Role.SUBMISSION and not self._authenticated
            case Fact.HELO_NOT_EHLO:
                return self._hello is not None and not self._hello.extended

    # -- argument parsers ----------------------------------------------------------------
    @staticmethod
    def _no_argument(arg: str, event: Event) -> Event:
        if arg:
            raise _Refused(replies.SYNTAX_ERROR)  # e.g. RFC 3207 §4: no STARTTLS params
        return event

    @staticmethod
    def _parse_hello(arg: str, *, extended: bool) -> Event:
        # RFC 5321 §4.1.1.1: "EHLO" SP ( Domain / address-literal ). We do not refuse
        # mail for a name that fails verification (§4.1.4), only for a missing or
        # non-printable one (it goes into the Received field).
        if not _HELLO_NAME.fullmatch(arg):
            raise _Refused(replies.HELLO_SYNTAX)
        return Hello(name=arg, extended=extended)

    @staticmethod
    def _parse_vrfy(arg: str) -> Event:
        if not arg:
            raise _Refused(replies.SYNTAX_ERROR)  # RFC 5321 §4.1.1.6: VRFY SP String
        return Vrfy(argument=arg)

    def _parse_auth(self, arg: str) -> Event:
        # RFC 4954 §4: "AUTH" SP sasl-mech [SP initial-response]
        parts = arg.split(" ")
        if not arg or len(parts) > 2 or not _SASL_MECH.fullmatch(parts[0]):
            raise _Refused(replies.SYNTAX_ERROR)
        mechanism = parts[0].upper()
        if mechanism not in AUTH_MECHANISMS:
            raise _Refused(replies.AUTH_MECHANISM_UNSUPPORTED)  # RFC 4954 §6: 504 5.5.4
        if len(parts) == 1:
            return AuthStart(mechanism=mechanism, initial=None)
        if parts[1] == "=":
            return AuthStart(mechanism=mechanism, initial=b"")  # RFC 4954 §4: empty IR
        initial = _b64decode(parts[1])
        if initial is None:
            raise _Refused(replies.AUTH_BAD_BASE64)  # RFC 4954 §4: 501 5.5.2
        return AuthStart(mechanism=mechanism, initial=initial)

    def _auth_response(self, line: bytes) -> Event:
        # RFC 4954 §4: each client response is a line of base64, or "*" to cancel.
        if line == b"*":
            return AuthResponse(data=None)
        data = _b64decode(line.decode("latin-1"))
        if data is None:
            raise self._refuse(replies.AUTH_BAD_BASE64, after=State.READY)
        return AuthResponse(data=data)

    def _parse_mail(self, arg: str) -> Event:
        # RFC 5321 §4.1.1.2: "MAIL FROM:" Reverse-path [SP Mail-parameters]
        path, params = _split_path_command(arg, "FROM:", replies.BAD_SENDER_SYNTAX)
        known = {"SIZE", "BODY", "SMTPUTF8"}
        if self.role is Role.SUBMISSION:
            known.add("AUTH")  # RFC 4954 §5: MAIL FROM ... AUTH=<mailbox>|<>
        if set(params) - known:
            raise _Refused(replies.UNKNOWN_PARAMETER)  # RFC 5321 §4.1.1.11: 555
        if "SIZE" in params:  # RFC 1870 §6
            value = params["SIZE"]
            if value is None or not _DIGITS.fullmatch(value):
                raise _Refused(replies.SYNTAX_ERROR)
            if int(value) > self.limits.message_size:
                raise _Refused(replies.MESSAGE_TOO_BIG)  # RFC 1870 §6.1: 552
        if "BODY" in params:  # RFC 6152 §2, RFC 3030 §3
            body = (params["BODY"] or "").upper()
            if body == "BINARYMIME":
                raise _Refused(replies.BINARYMIME_REFUSED)
            if body not in ("7BIT", "8BITMIME"):
                raise _Refused(replies.SYNTAX_ERROR)
            params["BODY"] = body
        if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
            raise _Refused(replies.SYNTAX_ERROR)  # RFC 6531 §3.4: no value
        if "AUTH" in params and params["AUTH"] is None:
            raise _Refused(replies.SYNTAX_ERROR)
        try:
            sender = address.parse_path(path, allow_null=True, utf8="SMTPUTF8" in params)
        except address.AddressError as exc:
            raise _Refused(_address_refusal(exc, replies.bad_sender)) from None
        return MailFrom(address=sender, params=MappingProxyType(params))

    def _parse_rcpt(self, arg: str) -> Event:
        # RFC 5321 §4.1.1.3: "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" /
        # Forward-path ) [SP Rcpt-parameters]
        path, params = _split_path_command(arg, "TO:", replies.BAD_RECIPIENT_SYNTAX)
        if params:
            raise _Refused(replies.UNKNOWN_PARAMETER)  # no RCPT extension (DSN) offered
        try:
            recipient = address.parse_path(
                path, allow_null=False, utf8=self._txn.utf8,
                postmaster_domain=self._postmaster_domain,
            )
        except address.AddressError as exc:
            raise _Refused(_address_refusal(exc, replies.bad_recipient)) from None
        if self._txn.recipients >= self.limits.recipients:
            # RFC 5321 §4.5.3.1.10: 452, and the client sends the rest later.
            raise _Refused(replies.TOO_MANY_RECIPIENTS, counts=False)
        return RcptTo(address=recipient, params=MappingProxyType(params))

    def _bdat(self, arg_bytes: bytes) -> Event:
        # RFC 3030 §2: "BDAT" SP chunk-size [ SP end-marker ]; end-marker = "LAST"
        parts = arg_bytes.split(b" ")
        if (
            not parts[0]
            or not _DIGITS.fullmatch(parts[0].decode("latin-1"))
            or len(parts) > 2
            or (len(parts) == 2 and parts[1].upper() != b"LAST")
        ):
            # Without a size we cannot know where the chunk ends: close.
            raise _Refused(replies.BAD_BDAT_SIZE)
        size = int(parts[0])
        last = len(parts) == 2
        try:
            self._check_allowed(Verb.BDAT)
        except _Refused:
            self._skip = size  # RFC 3030 §2: the refused chunk is read and discarded
            raise
        if self._txn.size + size > self.limits.message_size:
            self._txn.too_big = True  # RFC 1870 §6.1 via RFC 3030: 552 after the chunk
        self._txn.size += size
        return Bdat(size=size, last=last)

    # -- DATA content --------------------------------------------------------------------
    def _next_data_event(self) -> Event | NeedData:
        """RFC 5321 §4.1.1.4 and §4.5.2: content up to CRLF.CRLF, dot-unstuffed."""
        reader = self._data
        out = bytearray()
        if not reader.ended:
            self._scan_data(reader, out)
        if out:
            return DataChunk(bytes(out))
        if not reader.ended:
            return NEED_DATA
        if reader.bare:
            return DataAbort(replies.BARE_LINE_ENDING_IN_DATA)
        if self._txn.too_big:
            return DataAbort(replies.MESSAGE_TOO_BIG)
        return DataEnd()

    def _emit(self, out: bytearray, piece: bytes | bytearray) -> None:
        """Append content to the chunk being built, unless the message is refused."""
        txn = self._txn
        if self._data.bare or txn.too_big:
            return
        txn.size += len(piece)
        if txn.size > self.limits.message_size:
            txn.too_big = True  # from now on consume to the end without emitting
            return
        out += piece

    def _scan_data(self, reader: _DataReader, out: bytearray) -> None:
        buf = self._buf
        while len(out) < DATA_CHUNK_SIZE:
            pos = self._pos
            if reader.at_line_start:
                if buf.startswith(b".\r\n", pos):
                    self._pos = pos + 3  # the terminator: the line is exactly "."
                    reader.ended = True
                    return
                if len(buf) - pos < 3 and b".\r\n".startswith(buf[pos:]):
                    return  # "", "." or ".\r": cannot decide yet
            if reader.bare or self._txn.too_big:
                self._skip_to_terminator(reader)
                return
            if self._fast_lines(out):
                continue
            if reader.at_line_start:
                reader.at_line_start = False
                if buf[pos] == 0x2E:
                    # RFC 5321 §4.5.2: a leading period on a line with other characters
                    # is deleted (".\n" and ".\rX" are such lines: their bare CR/LF
                    # is caught below, and they are not the terminator).
                    self._pos = pos + 1
                continue
            room = DATA_CHUNK_SIZE - len(out)
            limit = min(len(buf), pos + room)
            m = _LINE_END.search(buf, pos, limit)
            end = limit if m is None else m.start()
            if end > pos:
                self._emit(out, buf[pos:end])
                self._pos = end
                continue
            if m is None:
                return  # everything buffered is consumed
            if buf[end] == 0x0A:
                reader.bare = True  # a bare LF is content of a bad message, not a line end
                self._pos = end + 1
                continue
            if end + 1 >= len(buf):
                return  # a CR at the end of the buffer: wait for the next byte
            if buf[end + 1] != 0x0A:
                reader.bare = True  # a bare CR, likewise
                self._pos = end + 1
                continue
            if room < 2:
                return  # the chunk is full; emit the CRLF with the next one
            self._emit(out, b"\r\n")
            self._pos = end + 2
            reader.at_line_start = True

    def _fast_lines(self, out: bytearray) -> bool:
        """Handle a run of complete, well-formed lines at once (a pure speed-up).

        Takes the buffered lines up to the last CRLF that fits in the chunk, cut before
        the terminator and before the first bare CR or LF. In such a run every CRLF is a
        real line end, so dot-unstuffing (RFC 5321 §4.5.2) is exactly: drop a leading "."
        of the first line if it starts a line, and replace CRLF "." with CRLF. Every scan
        covers only bytes that are consumed now, or one partial line, so the work stays
        linear in the input whatever it holds.
        """
        buf, pos, reader = self._buf, self._pos, self._data
        limit = min(len(buf), pos + DATA_CHUNK_SIZE - len(out))
        stop = buf.rfind(b"\r\n", pos, limit) + 2
        if stop <= pos + 1:
            return False
        term = buf.find(b"\r\n.\r\n", pos, stop)
        if term >= 0:
            stop = term + 2  # the next line is the terminator: the slow path sees it
        crlf = buf.count(b"\r\n", pos, stop)
        if buf.count(b"\r", pos, stop) != crlf or buf.count(b"\n", pos, stop) != crlf:
            m = _BARE.search(buf, pos, stop)
            if m is None:
                return False
            stop = buf.rfind(b"\r\n", pos, m.start()) + 2  # clean lines before it
            if stop <= pos + 1:
                return False
        segment = bytes(buf[pos:stop])
        if reader.at_line_start and segment.startswith(b"."):
            segment = segment[1:]
        self._emit(out, segment.replace(b"\r\n.", b"\r\n"))
        self._pos = stop
        reader.at_line_start = True
        return True

    def _skip_to_terminator(self, reader: _DataReader) -> None:
        """The message is refused: consume up to CRLF.CRLF without looking further.

        The caller has ruled out a terminator right at a line start, so from here the
        terminator is exactly the bytes CR LF "." CR LF. The last four bytes are kept in
        case they are its beginning; once we skip ahead we are no longer at a line start
        (else a kept ".\r\n" would pass for the end of the message).
        """
        buf = self._buf
        i = buf.find(b"\r\n.\r\n", self._pos)
        if i >= 0:
            self._pos = i + 5
            reader.ended = True
            return
        keep = len(buf) - 4
        if keep > self._pos:
            self._pos = keep
            reader.at_line_start = False

    # -- BDAT chunk ----------------------------------------------------------------------
    def _next_chunk_event(self) -> Event | NeedData:
        """RFC 3030 §2: exactly ``size`` octets follow the BDAT line, taken raw."""
        if self._chunk_left == 0:
            if self._txn.too_big:
                return DataAbort(replies.MESSAGE_TOO_BIG)
            return BdatEnd(last=self._chunk_last)
        while True:
            take = min(self._chunk_left, len(self._buf) - self._pos, DATA_CHUNK_SIZE)
            if take == 0:
                return NEED_DATA
            piece = bytes(self._buf[self._pos : self._pos + take])
            self._pos += take
            self._chunk_left -= take
            if not self._txn.too_big:
                return DataChunk(piece)
            if self._chunk_left == 0:
                return DataAbort(replies.MESSAGE_TOO_BIG)  # consumed, never emitted


# -- helpers -----------------------------------------------------------------------------
def _leaked_plain(arg: bytes) -> Credentials | None:
    """``PLAIN <initial-response>`` (RFC 4954 §4, RFC 4616 §2) refused before TLS: the
    credentials it carried in plaintext, if it is well-formed."""
    parts = arg.decode("latin-1").split(" ")
    if len(parts) != 2 or parts[0].upper() != "PLAIN":
        return None
    message = _b64decode(parts[1])
    return plain_credentials(message) if message else None


def _b64decode(text: str) -> bytes | None:
    """Strict base64 (RFC 4648 §4) as RFC 4954 requires; None if invalid."""
    if not text.isascii():
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _split_path_command(arg: str, keyword: str, bad: Reply) -> tuple[str, dict[str, str | None]]:
    """Split ``FROM:<path> PARAM=V ...`` into the path (with <>) and upper-cased params."""
    if arg[: len(keyword)].upper() != keyword:
        raise _Refused(replies.SYNTAX_ERROR)
    # RFC 5321 §4.1.1.2 has no space after the colon; many clients send one. Accept it.
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise _Refused(bad)
    close = _path_end(rest)
    if close < 0:
        raise _Refused(bad)
    path, tail = rest[: close + 1], rest[close + 1 :]
    if tail and not tail.startswith(" "):
        raise _Refused(bad)
    params: dict[str, str | None] = {}
    for item in tail.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise _Refused(replies.SYNTAX_ERROR)
        key = key.upper()
        if key in params:
            raise _Refused(replies.SYNTAX_ERROR)
        params[key] = value if eq else None
    return path, params


def _path_end(text: str) -> int:
    """Index of the ">" closing the path that starts ``text``, honouring quotes; or -1."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def _address_refusal(exc: address.AddressError, syntax: Callable[[str], Reply]) -> Reply:
    if exc.kind is address.AddressErrorKind.NON_ASCII:
        return replies.NON_ASCII_ADDRESS  # RFC 6531 §3.5: 553 5.6.7
    return syntax(str(exc))
