"""Drive the POP3 core without sockets: a stand-in session and the driver's loop.

``drive()`` does what ``pop3/server.py`` does with a stream (greeting aside): feed bytes,
take events until NEED_DATA, answer each with the session's reply or a ProtocolError's
hint, upgrade on STLS. ``FakeSession`` answers like a real session would, using only the
``replies`` builders, so the transcripts also check that the builders are enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postkeep.pop3 import replies
from postkeep.pop3.protocol import (
    NEED_DATA,
    AuthResponse,
    AuthStart,
    Capa,
    ConnectionClosed,
    Dele,
    Event,
    Limits,
    List,
    Noop,
    Pass,
    Pop3Server,
    ProtocolError,
    Quit,
    Retr,
    Rset,
    Stat,
    State,
    Stls,
    Top,
    Uidl,
    User,
)
from postkeep.pop3.replies import Reply

USER = "alice@example.test"
PASSWORD = "correct horse battery"
LOGIN = f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode()
HINT = "Use STLS first, or SSL/TLS on port 995: passwords are never sent unencrypted"


def make_core(
    *,
    tls_active: bool = False,
    tls_offered: bool = True,
    require_tls: bool = True,
    limits: Limits | None = None,
) -> Pop3Server:
    return Pop3Server(
        limits=limits or Limits(),
        tls_active=tls_active,
        tls_offered=tls_offered,
        require_tls=require_tls,
        starttls_hint=HINT,
    )


@dataclass
class FakeSession:
    """A maildrop of ``messages`` for one user, answering events like a real session."""

    core: Pop3Server
    messages: list[bytes]
    user: str | None = None
    deleted: set[int] = field(default_factory=set)
    committed: set[int] | None = None  # the deletions done in UPDATE
    events: list[Event] = field(default_factory=list)

    def _size(self) -> tuple[int, int]:
        live = [m for i, m in enumerate(self.messages, 1) if i not in self.deleted]
        return len(live), sum(len(m) for m in live)

    def _plain(self, message: bytes) -> Reply:
        parts = message.split(b"\x00")
        if len(parts) == 3 and parts[1] == USER.encode() and parts[2] == PASSWORD.encode():
            return replies.maildrop_ok(*self._size())
        return replies.AUTH_FAILED

    def _message(self, msg: int) -> bytes | Reply:
        if msg > len(self.messages):
            return replies.NO_SUCH_MESSAGE
        if msg in self.deleted:
            return replies.MESSAGE_DELETED
        return self.messages[msg - 1]

    def handle(self, event: Event) -> Reply:
        self.events.append(event)
        match event:
            case Capa():
                return self.core.capa_reply()
            case Stls():
                return replies.BEGIN_TLS
            case User(name=name):
                self.user = name
                return replies.USER_OK
            case Pass(password=password):
                if self.user == USER and password == PASSWORD:
                    return replies.maildrop_ok(*self._size())
                return replies.AUTH_FAILED
            case AuthStart(initial=None | b""):
                return replies.challenge(b"")  # RFC 4616: PLAIN waits for the client
            case AuthStart(initial=bytes() as initial):
                return self._plain(initial)
            case AuthResponse(data=None):
                return replies.AUTH_CANCELLED
            case AuthResponse(data=bytes() as data):
                return self._plain(data)
            case Stat():
                return replies.stat_reply(*self._size())
            case List(msg=None):
                return replies.list_reply(
                    (i, len(m)) for i, m in enumerate(self.messages, 1) if i not in self.deleted
                )
            case List(msg=int() as msg):
                found = self._message(msg)
                return found if isinstance(found, Reply) else replies.scan_listing(msg, len(found))
            case Uidl(msg=int() as msg):
                found = self._message(msg)
                return found if isinstance(found, Reply) else replies.uidl_one(msg, f"uid{msg}")
            case Retr(msg=msg):
                found = self._message(msg)
                return found if isinstance(found, Reply) else replies.retr_reply(found)
            case Top(msg=msg, lines=lines):
                found = self._message(msg)
                return found if isinstance(found, Reply) else replies.top_reply(found, lines)
            case Dele(msg=msg):
                found = self._message(msg)
                if isinstance(found, Reply):
                    return found
                self.deleted.add(msg)
                return replies.deleted(msg)
            case Uidl(msg=None):
                return replies.uidl_reply(
                    (i, f"uid{i}")
                    for i in range(1, len(self.messages) + 1)
                    if i not in self.deleted
                )
            case Noop():
                return replies.NOOP_OK
            case Rset():
                self.deleted.clear()
                return replies.maildrop_ok(*self._size())
            case Quit():
                if self.core.state is State.UPDATE:
                    self.committed = set(self.deleted)
                    return replies.signing_off(self._size()[0])
                return replies.signing_off()
        raise AssertionError(f"unexpected event {event!r}")


@dataclass
class Driver:
    """The driver loop of ``pop3/server.py``, minus the socket."""

    core: Pop3Server
    session: FakeSession
    dropped: list[bytes] = field(default_factory=list)  # what start_tls() returned
    closed: bool = False

    def feed(self, data: bytes) -> bytes:
        """Give ``data`` to the core and return everything written until it needs more."""
        out = bytearray()
        self.core.receive_data(data)
        while not self.closed:
            try:
                event = self.core.next_event()
            except ProtocolError as exc:
                out += self.core.send(exc.hint)
                self.closed = exc.hint.closes
                continue
            if event is NEED_DATA:
                break
            if isinstance(event, ConnectionClosed):
                self.closed = True
                break
            reply = self.session.handle(event)
            out += self.core.send(reply)
            if isinstance(event, Stls) and reply.ok:
                self.dropped.append(self.core.start_tls())
            self.closed = reply.closes
        return bytes(out)


def driver(
    messages: list[bytes] | None = None,
    *,
    tls_active: bool = False,
    tls_offered: bool = True,
    require_tls: bool = True,
    limits: Limits | None = None,
) -> Driver:
    core = make_core(
        tls_active=tls_active, tls_offered=tls_offered, require_tls=require_tls, limits=limits
    )
    return Driver(core, FakeSession(core, list(messages or [])))
