"""Drive the IMAP core with bytes in tests: a tiny stand-in for driver + session."""

from __future__ import annotations

from dataclasses import dataclass, field

from postkeep.imap import responses as r
from postkeep.imap.grammar import Append, Authenticate, Command, Event, Idle
from postkeep.imap.protocol import (
    NEED_DATA,
    AppendAborted,
    AppendChunk,
    AppendEnd,
    AuthAborted,
    AuthResponse,
    ConnectionClosed,
    ContinueLiteral,
    IdleDone,
    ImapServer,
    Limits,
    LiteralPending,
    Rejected,
    State,
)
from postkeep.imap.responses import BlobSlice, Condition

HINT = "Use STARTTLS first, or SSL/TLS on port 993"


def make_core(
    *,
    limits: Limits | None = None,
    tls_active: bool = True,
    tls_offered: bool = False,
    require_tls: bool = True,
) -> ImapServer:
    return ImapServer(
        limits=limits or Limits(),
        tls_active=tls_active,
        tls_offered=tls_offered,
        require_tls=require_tls,
        starttls_hint=HINT,
    )


def wire(parts: list[bytes | BlobSlice]) -> bytes:
    assert all(isinstance(p, bytes) for p in parts)
    return b"".join(p for p in parts if isinstance(p, bytes))


def ok(tag: str) -> r.StatusResponse:
    return r.tagged(tag, Condition.OK, "done")


@dataclass
class Autopilot:
    """Answers every event the way a cooperative session would, recording what happened.

    Commands get ``tag OK``; literals and APPENDs are accepted; IDLE and AUTHENTICATE get
    one continuation; rejections get the core's own response. ``out`` is the server's
    output, ``events`` what the core produced (AppendChunks merged into ``appended``).
    """

    core: ImapServer
    events: list[Event] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)
    appended: bytearray = field(default_factory=bytearray)
    login_state: State = State.AUTHENTICATED

    def feed(self, data: bytes) -> list[Event]:
        self.core.receive_data(data)
        return self.run()

    def run(self) -> list[Event]:
        new: list[Event] = []
        while True:
            event = self.core.next_event()
            if event is NEED_DATA:
                return new
            assert not isinstance(event, type(NEED_DATA))
            new.append(event)
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                return new
            self.answer(event)

    def send(self, item: r.Response | ContinueLiteral) -> None:
        self.out += wire(self.core.send(item))

    def answer(self, event: Event) -> None:
        match event:
            case LiteralPending() | Append():
                self.send(ContinueLiteral())
            case AppendChunk(data=data):
                self.appended += data
            case AppendEnd(tag=tag):
                self.send(ok(tag))
            case (
                Rejected(response=resp) | AppendAborted(response=resp) | AuthAborted(response=resp)
            ):
                self.send(resp)
            case IdleDone(tag=tag, response=resp):
                self.send(resp or ok(tag))
            case AuthResponse(tag=tag):
                self.send(ok(tag))
            case Idle() | Authenticate():
                self.send(r.continuation("idling" if isinstance(event, Idle) else ""))
            case Command(tag=tag):
                self.send(ok(tag))
            case _:
                raise AssertionError(f"unexpected event {event!r}")


def authenticated(**kwargs: object) -> Autopilot:
    """A core (TLS active) already logged in."""
    core = make_core(**kwargs)  # type: ignore[arg-type]
    pilot = Autopilot(core)
    pilot.feed(b"l0 LOGIN user pass\r\n")
    assert core.state is State.AUTHENTICATED
    pilot.events.clear()
    pilot.out.clear()
    return pilot


def selected(**kwargs: object) -> Autopilot:
    pilot = authenticated(**kwargs)
    pilot.feed(b"s0 SELECT INBOX\r\n")
    assert pilot.core.state is State.SELECTED
    pilot.events.clear()
    pilot.out.clear()
    return pilot
