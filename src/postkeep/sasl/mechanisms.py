"""The server side of the SASL mechanisms postkeep offers, sans-IO.

SMTP AUTH (RFC 4954), IMAP AUTHENTICATE (RFC 9051 §6.2.2) and POP3 AUTH (RFC 5034) all
frame SASL the same way: the protocol core base64-decodes each client response, handles
the cancel (``*``) and the empty-initial-response marker (``=``), and hands the decoded
bytes to a :class:`Mechanism` from :func:`server_mechanism`. The mechanism answers with a
:class:`Challenge` (send it, base64-encoded, and wait for the next response) or with
:class:`Done` (the exchange is complete: verify the :class:`Credentials`). Verifying them
is the auth service's job, never this module's.

Mechanisms:

- ``PLAIN`` (RFC 4616): one message ``[authzid] NUL authcid NUL passwd``.
- ``LOGIN`` (draft-murchison-sasl-login-00): obsolete, but still the only thing some
  clients (older Outlook, printers, scanners) speak. Challenges ``Username:`` and
  ``Password:``; an initial response is taken as the user name.

Both put the password on the wire in the clear, so the protocol cores offer them only
under TLS (RFC 4616 §3, RFC 8314 §3); that gate lives in each core's transition table, not
here.

Invariants:

- No I/O and no ``asyncio``, ``ssl``, ``socket``, ``logging`` or store imports: bytes in,
  :data:`Step` out.
- Any ``bytes`` given to ``start``/``step`` yield a :data:`Step` or raise
  :class:`SaslError`; no other exception escapes (tests/property/test_sasl.py).
- A :class:`SaslError` message is a fixed sentence: it never contains the client's data,
  so it may go on the wire and into logs.
- The password is never in a ``repr``/``str`` of :class:`Credentials` (nor, therefore, in
  a traceback or a log line that formats one).
- Every field is strict UTF-8 (RFC 3629), NUL-free, non-empty and at most
  :data:`MAX_FIELD_OCTETS` octets; identities also have no control characters.
- A mechanism object serves exactly one exchange: after :class:`Done` or a
  :class:`SaslError`, any further call raises :class:`SaslError`.
- We never act on behalf of another identity: ``Done.credentials.authzid`` always equals
  ``authcid`` (proxy authorization is refused, not silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "MAX_FIELD_OCTETS",
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "Done",
    "Login",
    "Mechanism",
    "Plain",
    "SaslError",
    "Step",
    "UnknownMechanism",
    "server_mechanism",
]

#: Largest authzid, authcid or password we accept, in octets. RFC 4616 §2 says a server
#: MUST accept at least 255 octets per field; 1 KiB leaves room for long passphrases while
#: bounding what an unauthenticated peer can make us decode and hash.
MAX_FIELD_OCTETS = 1024

#: Largest PLAIN message: three fields and two NULs.
_MAX_PLAIN_OCTETS = 3 * MAX_FIELD_OCTETS + 2

#: The mechanisms we implement, in the order we advertise them (PLAIN first: the LOGIN
#: draft §1 says clients SHOULD prefer PLAIN when it is offered).
MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client claims: verify ``authcid`` + ``password``, then act as ``authzid``.

    ``authzid`` is always equal to ``authcid`` (an empty authzid on the wire means "the
    same as authcid", RFC 4616 §2; any other value is refused).
    """

    authzid: str
    authcid: str
    # repr=False: a Credentials that ends up in a log line or a traceback must not leak the
    # password (DESIGN.md §5: never a password in a log).
    password: str = field(repr=False)


class SaslError(Exception):
    """The client's SASL exchange is malformed or out of order.

    The message is a fixed sentence that never contains client data, so the protocol may
    show it to the client (e.g. ``501 5.5.2 <message>``) and log it.
    """


class UnknownMechanism(SaslError, KeyError):
    """The client asked for a mechanism we do not implement.

    Both a :class:`SaslError` (one ``except`` in the cores) and a :class:`KeyError` (it is
    a failed lookup in :data:`MECHANISMS`).
    """

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message (quotes); we want the plain sentence.
        return str(self.args[0]) if self.args else "unsupported SASL mechanism"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` (base64-encoded by the protocol) and wait for another response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Done:
    """The exchange is complete; the caller verifies ``credentials``."""

    credentials: Credentials


Step = Challenge | Done


class Mechanism(Protocol):
    """One server-side SASL exchange."""

    name: str

    def start(self, initial: bytes | None) -> Step:
        """Begin, with the decoded initial response (RFC 4959 SASL-IR) or ``None``."""
        ...

    def step(self, data: bytes) -> Step:
        """Continue with the client's next decoded response."""
        ...


def _decode_field(raw: bytes, what: str, *, identity: bool) -> str:
    """Decode one credential field, enforcing the rules shared by PLAIN and LOGIN."""
    if not raw:
        # RFC 4616 §2: authcid and passwd are 1*SAFE, never empty.
        raise SaslError(f"empty {what}")
    if len(raw) > MAX_FIELD_OCTETS:
        raise SaslError(f"{what} too long")
    if b"\x00" in raw:
        # RFC 4616 §2: SAFE excludes NUL. LOGIN has no separator, but a NUL would truncate
        # the value in any C consumer further down, so it is refused there too.
        raise SaslError(f"NUL in {what}")
    try:
        # RFC 4616 §2 requires UTF-8; Python's strict decoder refuses overlong forms and
        # surrogates exactly as RFC 3629 (and the SAFE production) does.
        text = raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not valid UTF-8") from None
    if identity and any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text):
        # Identities are mail addresses here and are logged (user=...): no C0/C1 controls,
        # so a user name can never forge a log line or a header. Passwords are form-free.
        raise SaslError(f"control character in {what}")
    return text


class Plain:
    """PLAIN (RFC 4616), server side."""

    name = "PLAIN"

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = "new"  # new -> waiting -> done

    def start(self, initial: bytes | None) -> Step:
        if self._state != "new":
            raise SaslError("SASL exchange already started")
        if not initial:
            # No initial response, or an empty one ("=" in RFC 4954 §4): RFC 4422 §5 has
            # the server send an empty challenge, and the client answers with the message.
            self._state = "waiting"
            return Challenge(b"")
        return self._finish(initial)

    def step(self, data: bytes) -> Step:
        if self._state != "waiting":
            raise SaslError("unexpected SASL response")
        return self._finish(data)

    def _finish(self, message: bytes) -> Done:
        # Whatever happens below, this exchange is over: a retry needs a new AUTH command.
        self._state = "done"
        if len(message) > _MAX_PLAIN_OCTETS:
            raise SaslError("PLAIN message too long")
        # RFC 4616 §2: message = [authzid] UTF8NUL authcid UTF8NUL passwd. Exactly two NULs;
        # a third would be a NUL inside passwd, which SAFE forbids.
        parts = message.split(b"\x00")
        if len(parts) != 3:
            raise SaslError("malformed PLAIN message: expected authzid NUL authcid NUL password")
        raw_authzid, raw_authcid, raw_password = parts
        authcid = _decode_field(raw_authcid, "authentication identity", identity=True)
        password = _decode_field(raw_password, "password", identity=False)
        if raw_authzid:
            authzid = _decode_field(raw_authzid, "authorization identity", identity=True)
            # RFC 4616 §2 lets the server authorize one identity to act as another; we do
            # not support proxy authorization, so anything but "myself" is refused rather
            # than ignored (ignoring it would log in as someone the client did not ask for).
            if authzid != authcid:
                raise SaslError("authorization identity must equal the authentication identity")
        return Done(Credentials(authzid=authcid, authcid=authcid, password=password))


class Login:
    """LOGIN (draft-murchison-sasl-login-00), server side."""

    name = "LOGIN"

    __slots__ = ("_state", "_username")

    # draft-murchison-sasl-login-00 §2.2 suggests "User Name" and "Password"; the
    # de-facto challenges every client expects are "Username:" and "Password:" (and
    # clients are told to ignore the content anyway).
    USERNAME_CHALLENGE = b"Username:"
    PASSWORD_CHALLENGE = b"Password:"

    def __init__(self) -> None:
        self._state = "new"  # new -> username -> password -> done
        self._username = ""

    def start(self, initial: bytes | None) -> Step:
        if self._state != "new":
            raise SaslError("SASL exchange already started")
        if not initial:
            # No (or an empty, "=") initial response: ask for the user name.
            self._state = "username"
            return Challenge(self.USERNAME_CHALLENGE)
        # The draft's §2.1: an initial response, where the protocol allows one, is the
        # user name (what "AUTH LOGIN dXNlcg==" sends).
        return self._take_username(initial)

    def step(self, data: bytes) -> Step:
        if self._state == "username":
            return self._take_username(data)
        if self._state == "password":
            self._state = "done"
            password = _decode_field(data, "password", identity=False)
            user = self._username
            return Done(Credentials(authzid=user, authcid=user, password=password))
        raise SaslError("unexpected SASL response")

    def _take_username(self, data: bytes) -> Challenge:
        self._state = "done"  # until the user name is known good
        self._username = _decode_field(data, "user name", identity=True)
        self._state = "password"
        return Challenge(self.PASSWORD_CHALLENGE)


_REGISTRY: dict[str, type[Plain] | type[Login]] = {"PLAIN": Plain, "LOGIN": Login}


def plain_credentials(message: bytes) -> Credentials | None:
    """The credentials in a PLAIN message (RFC 4616 §2), or None if it is not one.

    For a message a client sent *before TLS* and that was refused unread: the caller checks
    whether the password was real, to warn its owner (``auth/exposure.py``)."""
    try:
        done = Plain().start(message)
    except SaslError:
        return None
    return done.credentials if isinstance(done, Done) else None


def server_mechanism(name: str) -> Mechanism:
    """A fresh server-side exchange for ``name`` (case-insensitive, RFC 4422 §3.1).

    Raises :class:`UnknownMechanism` (a :class:`SaslError` and a :class:`KeyError`) for
    anything not in :data:`MECHANISMS`; its message does not echo the client's name.
    """
    # RFC 4422 §3.1: mechanism names are upper-case ASCII; clients may send any case.
    # .upper() on non-ASCII could map to ASCII ("ı".upper() == "I"), so ASCII only.
    key = name.upper() if name.isascii() else ""
    cls = _REGISTRY.get(key)
    if cls is None:
        raise UnknownMechanism("unsupported SASL mechanism")
    return cls()
