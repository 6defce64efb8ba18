"""One conversation with a server, the same five questions in SMTP, IMAP and POP3.

Each ``Dialogue`` drives a client core (``probe/smtp.py``, ``imap/client.py``,
``pop3/client.py``) over a ``wire.Connection``: read the greeting, ask what is offered,
upgrade with STARTTLS/STLS (optionally with an injected command in the same segment), try
an obviously fake login, and look for anything the server says by itself after TLS.

Invariants:
- No real credential is ever sent: ``fake_login`` uses ``FAKE_USER``/``FAKE_PASSWORD``,
  which name no account anywhere (``.invalid`` is reserved, RFC 2606 §2).
- After the server's go-ahead, bytes it sent before the handshake are dropped and counted
  (``Upgrade.dropped``), never parsed.
- Every read has the dialogue's deadline; nothing here can wait forever.
"""

from __future__ import annotations

import base64
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from postkeep.imap import client as imap
from postkeep.pop3 import client as pop3
from postkeep.probe import smtp
from postkeep.probe.wire import Connection

FAKE_USER = "postkeep-probe@nobody.invalid"
FAKE_PASSWORD = "not-a-password-postkeep-probe"
EHLO_NAME = "postkeep-probe.invalid"

#: Words servers use when they refuse a login because the connection is not encrypted.
_NEEDS_TLS = re.compile(r"(?i)tls|ssl|encrypt|privacy|secure|starttls|stls")

T = TypeVar("T")


class DialogueError(Exception):
    """The server did not speak the protocol we expected (or closed the connection)."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What the server advertises at one moment (before or after TLS)."""

    starttls: bool
    auth: tuple[str, ...]  # SASL mechanisms (SMTP AUTH, IMAP AUTH=, POP3 SASL)
    login_disabled: bool | None = None  # IMAP LOGINDISABLED; None for other protocols
    user: bool | None = None  # POP3 USER; None for other protocols
    raw: tuple[str, ...] = ()

    @property
    def password_possible(self) -> bool:
        """Whether a client could send a password now (EXTERNAL needs none)."""
        mechs = [m for m in self.auth if m not in ("EXTERNAL", "ANONYMOUS")]
        return bool(mechs) or self.login_disabled is False or bool(self.user)


@dataclass(frozen=True, slots=True)
class Upgrade:
    agreed: bool
    reply: str
    dropped: int  # plaintext bytes the server sent after its go-ahead (dropped, unread)


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    #: "refused" (TLS required first), "rejected" (the fake credentials were *checked*: a
    #: real password would be accepted in plaintext), "accepted", "unavailable" (no login
    #: at all), "error" (a temporary failure or a broken connection).
    outcome: str
    reply: str


class Dialogue(ABC):
    protocol: str

    def __init__(self, conn: Connection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout

    async def _pump(self, step: Callable[[], T | None], feed: Callable[[bytes], None]) -> T:
        """Call ``step`` until it yields something; feed it bytes meanwhile."""
        deadline = time.monotonic() + self.timeout
        while True:
            result = step()
            if result is not None:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            feed(await self.conn.read(left))

    @abstractmethod
    async def greeting(self) -> str: ...

    @abstractmethod
    async def offer(self) -> Offer: ...

    @abstractmethod
    async def starttls(self, *, inject: bool = False) -> Upgrade: ...

    @abstractmethod
    async def fake_login(self) -> LoginAttempt: ...

    @property
    @abstractmethod
    def injected(self) -> bytes:
        """The harmless command pipelined after STARTTLS in the injection test."""

    async def unsolicited(self, wait: float) -> bytes:
        """Bytes the server sends by itself within ``wait`` seconds (after TLS: none)."""
        try:
            return await self.conn.read(wait)
        except TimeoutError:
            return b""


# -- SMTP ----------------------------------------------------------------------------------
class SmtpDialogue(Dialogue):
    protocol = "smtp"

    def __init__(self, conn: Connection, timeout: float) -> None:
        super().__init__(conn, timeout)
        self.core = smtp.SmtpExchange()
        self._ehlo_done = False

    async def _reply(self) -> smtp.SmtpReply:
        def step() -> smtp.SmtpReply | None:
            try:
                r = self.core.next_reply()
            except smtp.SmtpProtocolError as exc:
                raise DialogueError(str(exc)) from None
            if r is None:
                raise DialogueError("the server closed the connection")
            return None if r is smtp.NEED_DATA else r

        return await self._pump(step, self.core.receive_data)

    async def greeting(self) -> str:
        reply = await self._reply()
        if reply.code != 220:
            raise DialogueError(f"greeting {reply.code} {reply.text}")
        return f"{reply.code} {reply.text}"

    async def offer(self) -> Offer:
        self.conn.write(self.core.send("EHLO", EHLO_NAME))
        reply = await self._reply()
        if reply.code != 250:
            raise DialogueError(f"EHLO refused: {reply.code} {reply.text}")
        self._ehlo_done = True
        return Offer(
            starttls=self.core.starttls_offered,
            auth=self.core.auth_mechanisms,
            raw=reply.lines[1:],
        )

    async def starttls(self, *, inject: bool = False) -> Upgrade:
        if not self._ehlo_done:
            await self.offer()
        data = self.core.send("STARTTLS")
        if inject:
            data += self.injected  # one write: one TCP segment on loopback and most paths
        self.conn.write(data)
        reply = await self._reply()
        if reply.code != 220:
            return Upgrade(False, f"{reply.code} {reply.text}", 0)
        # The mirror image of RFC 3207 §4.2: what came after the 220 is not to be trusted.
        dropped = self.core.start_tls() + self.conn.take_buffer()
        self._ehlo_done = False
        return Upgrade(True, f"{reply.code} {reply.text}", len(dropped))

    @property
    def injected(self) -> bytes:
        return b"NOOP\r\n"

    async def fake_login(self) -> LoginAttempt:
        if not self._ehlo_done:
            await self.offer()
        token = base64.b64encode(f"\0{FAKE_USER}\0{FAKE_PASSWORD}".encode()).decode()
        self.conn.write(self.core.send("AUTH", f"PLAIN {token}"))
        reply = await self._reply()
        text = f"{reply.code} {reply.text}"
        if reply.code == 235:
            outcome = "accepted"
        elif reply.code == 334:
            self.conn.write(b"*\r\n")  # RFC 4954 §4: cancel the exchange
            outcome = "rejected"
        elif reply.code in (530, 538, 523):
            outcome = "refused"  # RFC 3207 §4 530 5.7.0, RFC 4954 §6 538 5.7.11
        elif reply.code == 535:
            outcome = "rejected"  # RFC 4954 §6 535 5.7.8: the credentials were checked
        elif reply.code in (500, 502, 503, 504):
            outcome = "unavailable"  # no AUTH here at all (e.g. port 25)
        elif _NEEDS_TLS.search(reply.text):
            outcome = "refused"
        else:
            outcome = "error"
        return LoginAttempt(outcome, text)


# -- IMAP ----------------------------------------------------------------------------------
class ImapDialogue(Dialogue):
    protocol = "imap"

    def __init__(self, conn: Connection, timeout: float, *, tls_active: bool = False) -> None:
        super().__init__(conn, timeout)
        self.core = imap.ImapClient(tls_active=tls_active)

    async def _event(self) -> imap.Event:
        def step() -> imap.Event | None:
            try:
                ev = self.core.next_event()
            except imap.ProtocolError as exc:
                raise DialogueError(str(exc)) from None
            if isinstance(ev, imap.ConnectionClosed):
                raise DialogueError("the server closed the connection")
            return None if ev is imap.NEED_DATA else ev

        return await self._pump(step, self.core.receive_data)

    async def _tagged(self) -> imap.Tagged:
        while True:
            ev = await self._event()
            if isinstance(ev, imap.Tagged):
                return ev

    async def greeting(self) -> str:
        ev = await self._event()
        if not isinstance(ev, imap.Greeting) or ev.status == "BYE":
            raise DialogueError("no IMAP greeting")
        code = f"[{ev.code}] " if ev.code else ""
        return f"* {ev.status} {code}{ev.text}"

    async def offer(self) -> Offer:
        self.conn.write(self.core.send(imap.Capability()))
        reply = await self._tagged()
        if not reply.ok:
            raise DialogueError(f"CAPABILITY refused: {reply.status} {reply.text}")
        return Offer(
            starttls=self.core.starttls_offered,
            auth=self.core.auth_mechanisms,
            login_disabled=self.core.login_disabled,
            raw=tuple(sorted(self.core.capabilities)),
        )

    async def starttls(self, *, inject: bool = False) -> Upgrade:
        data = self.core.send(imap.StartTls())
        if inject:
            data += self.injected
        self.conn.write(data)
        reply = await self._tagged()
        text = f"{reply.status} {reply.text}"
        if not reply.ok:
            return Upgrade(False, text, 0)
        # RFC 2595 §3.1, client side: bytes after the OK came before TLS; drop them.
        dropped = self.core.start_tls() + self.conn.take_buffer()
        return Upgrade(True, text, len(dropped))

    @property
    def injected(self) -> bytes:
        return b"x NOOP\r\n"

    async def fake_login(self) -> LoginAttempt:
        self.conn.write(self.core.send(imap.Login(FAKE_USER, FAKE_PASSWORD)))
        reply = await self._tagged()
        code = f"[{reply.code}] " if reply.code else ""
        text = f"{reply.status} {code}{reply.text}"
        upper_code = (reply.code or "").upper()
        if reply.ok:
            outcome = "accepted"
        elif upper_code == "PRIVACYREQUIRED" or _NEEDS_TLS.search(reply.text):
            outcome = "refused"  # RFC 9051 §7.1 PRIVACYREQUIRED; RFC 2595 LOGINDISABLED
        elif reply.status == "BAD":
            outcome = "refused" if self.core.login_disabled else "error"
        elif upper_code == "UNAVAILABLE":
            outcome = "error"
        else:
            outcome = "rejected"  # AUTHENTICATIONFAILED: the password was checked
        return LoginAttempt(outcome, text)


# -- POP3 ----------------------------------------------------------------------------------
class Pop3Dialogue(Dialogue):
    protocol = "pop3"

    def __init__(self, conn: Connection, timeout: float, *, tls_active: bool = False) -> None:
        super().__init__(conn, timeout)
        self.core = pop3.Pop3Client(tls_active=tls_active)

    async def _event(self) -> pop3.Greeting | pop3.Reply:
        def step() -> pop3.Greeting | pop3.Reply | None:
            try:
                ev = self.core.next_event()
            except pop3.ProtocolError as exc:
                raise DialogueError(str(exc)) from None
            if isinstance(ev, pop3.ConnectionClosed):
                raise DialogueError("the server closed the connection")
            return None if ev is pop3.NEED_DATA else ev

        return await self._pump(step, self.core.receive_data)

    async def _reply(self) -> pop3.Reply:
        ev = await self._event()
        if not isinstance(ev, pop3.Reply):
            raise DialogueError("unexpected greeting")
        return ev

    async def greeting(self) -> str:
        ev = await self._event()
        if not isinstance(ev, pop3.Greeting) or not ev.ok:
            raise DialogueError("no POP3 greeting")
        return f"+OK {ev.text}"

    async def offer(self) -> Offer:
        self.conn.write(self.core.send(pop3.Capa()))
        reply = await self._reply()
        if not reply.ok:
            # RFC 2449 is optional: a server without CAPA tells us nothing.
            return Offer(starttls=False, auth=(), user=None)
        return Offer(
            starttls=self.core.stls_offered,
            auth=self.core.sasl_mechanisms,
            user=self.core.user_offered,
            raw=reply.lines,
        )

    async def starttls(self, *, inject: bool = False) -> Upgrade:
        data = self.core.send(pop3.Stls())
        if inject:
            data += self.injected
        self.conn.write(data)
        reply = await self._reply()
        text = f"{'+OK' if reply.ok else '-ERR'} {reply.text}"
        if not reply.ok:
            return Upgrade(False, text, 0)
        # RFC 2595 §4, client side: bytes after the +OK came before TLS; drop them.
        dropped = self.core.start_tls() + self.conn.take_buffer()
        return Upgrade(True, text, len(dropped))

    @property
    def injected(self) -> bytes:
        return b"NOOP\r\n"

    async def fake_login(self) -> LoginAttempt:
        self.conn.write(self.core.send(pop3.User(FAKE_USER)))
        reply = await self._reply()
        if reply.ok:
            self.conn.write(self.core.send(pop3.Pass(FAKE_PASSWORD)))
            reply = await self._reply()
        code = f"[{reply.code}] " if reply.code else ""
        text = f"{'+OK' if reply.ok else '-ERR'} {code}{reply.text}"
        if reply.ok:
            outcome = "accepted"
        elif reply.command == "USER" and _NEEDS_TLS.search(reply.text):
            outcome = "refused"  # RFC 2595 §2.3 / RFC 8314: no credentials before TLS
        elif (reply.code or "").upper() in ("SYS/TEMP", "IN-USE"):
            outcome = "error"
        else:
            outcome = "rejected"
        return LoginAttempt(outcome, text)


DIALOGUES: dict[str, type[Dialogue]] = {
    "smtp": SmtpDialogue,
    "imap": ImapDialogue,
    "pop3": Pop3Dialogue,
}
