"""Drive the sans-IO SMTP server core with bytes, the way the asyncio driver does.

    t = Transcript(core)                       # greets
    t.client(b"EHLO c\\r\\n")
    t.expect(Hello("c", extended=True), reply=t.core.hello_reply())
    t.expect_refusal(503, "5.5.1")             # a ProtocolError, its hint sent
    items = t.run()                            # drain with the accept-everything policy

Everything the server writes accumulates in ``t.wire``.
"""

from __future__ import annotations

from collections.abc import Callable

from postkeep.smtp import replies
from postkeep.smtp.protocol import (
    NEED_DATA,
    AuthResponse,
    AuthStart,
    Bdat,
    BdatEnd,
    ConnectionClosed,
    Data,
    DataAbort,
    DataChunk,
    DataEnd,
    Event,
    Hello,
    Limits,
    NeedData,
    ProtocolError,
    Quit,
    Role,
    SmtpServer,
    StartTls,
)
from postkeep.smtp.replies import Reply

Policy = Callable[[Event], Reply]
HINT = "Must issue a STARTTLS command first, or use port 465 with SSL/TLS"
Item = Event | Reply  # a Reply item is a ProtocolError hint


def make_core(
    *,
    role: Role = Role.MX,
    limits: Limits | None = None,
    tls_active: bool = False,
    tls_offered: bool = True,
    require_tls: bool = False,
    hostname: str = "mx.test",
) -> SmtpServer:
    """A core as app.py builds one; the defaults are port 25 before STARTTLS."""
    return SmtpServer(
        role=role,
        limits=limits or Limits(),
        hostname=hostname,
        tls_active=tls_active,
        tls_offered=tls_offered,
        require_tls=require_tls,
        starttls_hint=HINT,
    )


def accept_all(core: SmtpServer) -> Policy:
    """A session that says yes to everything (and authenticates anyone)."""

    def answer(event: Event) -> Reply:
        match event:
            case Hello():
                return core.hello_reply()
            case StartTls():
                return replies.READY_FOR_TLS
            case AuthStart() | AuthResponse():
                return replies.AUTH_OK
            case Data():
                return replies.START_DATA
            case DataEnd():
                return replies.queued("Q1")
            case BdatEnd(last=last):
                return replies.queued("Q1") if last else replies.chunk_ok(0)
            case DataAbort(reply=refusal):
                return refusal
            case Quit():
                return replies.BYE
            case Bdat():
                return replies.OK
        return replies.OK

    return answer


class Transcript:
    def __init__(self, core: SmtpServer, *, greet: bool = True) -> None:
        self.core = core
        self.wire = bytearray()
        if greet:
            self.wire += core.greet()

    def client(self, data: bytes) -> None:
        self.core.receive_data(data)

    def send(self, reply: Reply) -> bytes:
        out = self.core.send(reply)
        self.wire += out
        return out

    def event(self) -> Event | NeedData:
        return self.core.next_event()

    def expect(self, expected: Event, reply: Reply | None = None) -> bytes:
        got = self.core.next_event()
        assert got == expected, f"expected {expected!r}, got {got!r}"
        return self.send(reply) if reply is not None else b""

    def expect_hello(self, name: str, *, extended: bool = True) -> bytes:
        """Expect a Hello event and answer it with the core's own capability reply."""
        got = self.core.next_event()
        assert got == Hello(name, extended=extended), f"expected Hello {name}, got {got!r}"
        return self.send(self.core.hello_reply())

    def expect_need_data(self) -> None:
        got = self.core.next_event()
        assert got is NEED_DATA, f"expected NEED_DATA, got {got!r}"

    def expect_refusal(self, code: int, enhanced: str | None = None) -> Reply:
        try:
            got = self.core.next_event()
        except ProtocolError as exc:
            hint = exc.hint
        else:
            raise AssertionError(f"expected a ProtocolError {code}, got {got!r}")
        assert hint.code == code, f"expected {code}, got {hint.render()!r}"
        if enhanced is not None:
            assert hint.enhanced == enhanced, f"expected {enhanced}, got {hint.render()!r}"
        self.send(hint)
        return hint

    def read_message(self) -> tuple[bytes, Event | NeedData]:
        """Gather DataChunk events; returns the content and the event that followed."""
        content = bytearray()
        while True:
            got = self.core.next_event()
            if not isinstance(got, DataChunk):
                return bytes(content), got
            content += got.data

    def run(self, policy: Policy | None = None) -> list[Item]:
        """Drain until NEED_DATA or ConnectionClosed, answering every event with
        ``policy``; consecutive DataChunks are merged into one."""
        answer = policy or accept_all(self.core)
        items: list[Item] = []
        while True:
            try:
                got = self.core.next_event()
            except ProtocolError as exc:
                items.append(exc.hint)
                self.send(exc.hint)
                continue
            if got is NEED_DATA:
                return items
            if isinstance(got, DataChunk):
                if items and isinstance(items[-1], DataChunk):
                    items[-1] = DataChunk(items[-1].data + got.data)
                else:
                    items.append(got)
                continue
            items.append(got)
            if isinstance(got, ConnectionClosed):
                return items
            if isinstance(got, StartTls):
                return items  # the caller decides about start_tls()
            self.send(answer(got))
