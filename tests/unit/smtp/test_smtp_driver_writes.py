"""How the SMTP driver (``smtp/server.py``) writes replies: the replies to a pipelined
group go out together, in order, and none is ever held while the driver waits to read
(RFC 2920 §3.2), when it closes, or when the session crashes."""

from __future__ import annotations

from typing import Any, cast

from helpers.transcript import make_core
from postkeep.net.stream import Stream
from postkeep.smtp import replies
from postkeep.smtp.protocol import (
    Data,
    DataEnd,
    Event,
    Hello,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Role,
    SmtpServer,
)
from postkeep.smtp.replies import Reply, reply
from postkeep.smtp.server import serve
from postkeep.smtp.session import SmtpSession

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


class ScriptedStream:
    """Hands out the scripted reads one by one (then EOF) and logs every read and write."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = list(reads)
        self.log: list[tuple[str, bytes]] = []

    async def read(self, timeout: float | None = None, *, idle: bool = False) -> bytes:
        self.log.append(("read", b""))
        return self._reads.pop(0) if self._reads else b""

    def write(self, data: bytes) -> None:
        self.log.append(("write", data))

    async def drain(self) -> None:
        return None

    @property
    def writes(self) -> list[bytes]:
        return [data for kind, data in self.log if kind == "write"]


class AcceptingSession:
    """Accepts everything; ``crash_on`` makes it raise on that event type instead."""

    def __init__(self, core: SmtpServer, crash_on: type[Event] | None = None) -> None:
        self.core = core
        self.crash_on = crash_on
        self.chunks: list[bytes] = []

    async def handle(self, event: Event) -> Reply:
        if self.crash_on is not None and isinstance(event, self.crash_on):
            raise RuntimeError("session bug")
        match event:
            case Hello():
                return self.core.hello_reply()
            case MailFrom():
                return reply(250, "2.1.0", "Sender OK")
            case RcptTo():
                return reply(250, "2.1.5", "Recipient OK")
            case Data():
                return replies.START_DATA
            case DataEnd():
                return replies.queued("Q1")
            case Noop():
                return replies.OK
            case Quit():
                return replies.BYE
        raise AssertionError(event)

    def data_chunk(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def abandon(self) -> None:
        pass


async def run(reads: list[bytes], crash_on: type[Event] | None = None) -> ScriptedStream:
    core = make_core(role=Role.MX)
    stream = ScriptedStream(reads)
    session = AcceptingSession(core, crash_on)
    await serve(cast(Stream, stream), core, cast(SmtpSession, cast(Any, session)),
                tls_context=None, idle_timeout=5, data_timeout=5)
    return stream


def codes(data: bytes) -> list[bytes]:
    return [line[:4] for line in data.split(b"\r\n") if line]


async def test_a_pipelined_group_is_answered_in_one_write_before_the_next_read() -> None:
    stream = await run([
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@d.test>\r\nDATA\r\n",
        MESSAGE,
        b"QUIT\r\n",
    ])
    kinds = [kind for kind, _ in stream.log]
    # greeting, read EHLO, its reply, read the group, one write for it, read the message,
    # the 250 for it, read QUIT, the 221.
    assert kinds == ["write", "read", "write", "read", "write", "read", "write", "read",
                     "write"]
    group = stream.writes[2]
    assert codes(group) == [b"250 ", b"250 ", b"250 ", b"354 "]
    assert codes(stream.writes[3]) == [b"250 "]
    assert codes(stream.writes[4]) == [b"221 "]


async def test_one_command_at_a_time_gets_each_reply_before_the_next_read() -> None:
    stream = await run([b"EHLO client.test\r\n", b"NOOP\r\n", b"NOOP\r\n"])
    kinds = [kind for kind, _ in stream.log]
    assert kinds == ["write", "read", "write", "read", "write", "read", "write", "read"]
    assert [codes(w)[-1] for w in stream.writes[1:]] == [b"250 ", b"250 ", b"250 "]


async def test_replies_pending_at_quit_go_out_with_the_221() -> None:
    stream = await run([b"EHLO client.test\r\n", b"NOOP\r\nNOOP\r\nQUIT\r\nNOOP\r\n"])
    assert codes(stream.writes[-1]) == [b"250 ", b"250 ", b"221 "]  # nothing after QUIT


async def test_a_crash_writes_the_pending_replies_then_421() -> None:
    stream = await run(
        [b"EHLO client.test\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"],
        crash_on=RcptTo,
    )
    assert codes(b"".join(stream.writes[2:])) == [b"250 ", b"421 "]


async def test_a_refusal_by_the_core_is_written_with_the_group() -> None:
    stream = await run([b"EHLO client.test\r\n", b"MAIL FROM:<a@b.test>\r\nBOGUS\r\nNOOP\r\n"])
    assert codes(stream.writes[2]) == [b"250 ", b"500 ", b"250 "]
