"""Passwords that crossed the wire in plaintext: find out, mark the account, tell its owner.

A mail program set to "None" (or to STARTTLS where it does not insist on it) may send a
password before TLS: SMTP ``AUTH PLAIN <initial-response>`` on 587, IMAP ``LOGIN`` or
``AUTHENTICATE PLAIN <initial-response>`` on 143, POP3 ``USER``/``PASS`` or ``AUTH PLAIN``
on 110. The cores refuse them as always (RFC 2595 §2.3, RFC 3207 §4, RFC 8314) and hand
what was on the wire to the driver, which calls :meth:`PlaintextLeaks.check` *after* the
refusal has been written. Whoever listened on the path may now have the password, so if
it was the right one:

- the account is marked exposed (store: ``record_exposure``: time, client address,
  service), which ``postkeep user list`` shows;
- its owner gets one message in the INBOX naming the setting that leaked it and the
  settings to use — once per (account, client address, service) per ``NOTIFY_EVERY``, so
  a program that keeps retrying does not flood the INBOX;
- ``[security] exposed_password`` decides what else happens: ``warn`` nothing,
  ``require_change`` refuses logins until ``postkeep user passwd``, ``lock`` until
  ``postkeep user unlock`` (auth/service.py enforces both).

Invariants:
- The refusal the client sees never depends on the password being right: it is written
  before the check starts, and it is the same reply as for any credentials before TLS.
- Verification is ``Authenticator.verify_plaintext``: the login throttle and the
  constant-time argon2 check, so a wrong password counts as a failed login and this is no
  unthrottled way to guess.
- A wrong password marks nothing, sends nothing, logs nothing beyond the failed attempt.
- The password is never stored, logged or put in the notice.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, make_msgid

from postkeep import log
from postkeep.auth.service import Authenticator
from postkeep.config.schema import SERVICE_PORTS, Service
from postkeep.hints import Ports
from postkeep.ingest import Disposition, Envelope, Ingest
from postkeep.sasl.mechanisms import Credentials
from postkeep.store.api import StorageError, Store

logger = log.get_logger("auth")

#: At most one notice per (account, client address, service) in this time.
NOTIFY_EVERY = timedelta(days=1)

#: service → (what the program calls that server, the implicit-TLS service to use instead,
#: the upgrade word).
_WHAT: dict[Service, tuple[str, Service, str]] = {
    Service.SUBMISSION: ("outgoing server (SMTP)", Service.SUBMISSIONS, "STARTTLS"),
    Service.IMAP: ("incoming server (IMAP)", Service.IMAPS, "STARTTLS"),
    Service.POP3: ("incoming server (POP3)", Service.POP3S, "STARTTLS"),
}

_POLICY_WORDS = {
    "warn": "",
    "require_change": (
        "Until your password is changed, this server refuses to log you in. Ask your "
        "administrator for a new password (postkeep user passwd), then enter it in every "
        "mail program you use, with the settings below."
    ),
    "lock": (
        "Your account is locked until your administrator unlocks it (postkeep user "
        "unlock) or gives you a new password (postkeep user passwd)."
    ),
}


def notice_text(
    *, address: str, hostname: str, peer_ip: str, service: Service, when: datetime,
    ports: Ports, policy: str,
) -> str:
    """The body of the notice: what happened, which setting caused it, what to set."""
    what, implicit, word = _WHAT[service]
    port = ports.of(service) or SERVICE_PORTS[service][0]
    good = ports.of(implicit)
    if good is not None:
        use = (
            f"  Server:              {hostname}\n"
            f"  Port:                {good}\n"
            "  Connection security: SSL/TLS  (Apple Mail: \"Use TLS/SSL\" on)\n"
            f"  (or port {port} with connection security {word}; never \"None\")\n"
        )
    else:
        use = (
            f"  Server:              {hostname}\n"
            f"  Port:                {port}\n"
            f"  Connection security: {word}  (never \"None\")\n"
        )
    extra = _POLICY_WORDS[policy]
    return (
        f"Your password for {address} was sent without encryption.\n\n"
        f"On {when:%Y-%m-%d at %H:%M} UTC, a mail program at {peer_ip} sent your correct "
        f"password to the {what}, port {port}, before switching on encryption. This "
        "server refused it, but anyone on the network path may have read it.\n\n"
        f"The cause is the \"Connection security\" setting (Thunderbird, K-9 Mail; "
        f"\"Encryption method\" in Outlook) of the {what} in that program: it is set to "
        "\"None\", or the program does not insist on encryption.\n\n"
        "Change it to:\n\n"
        f"{use}"
        "  Username:            your full email address\n"
        "  Authentication:      normal password\n\n"
        "Because the password may have been seen, change it as well.\n"
        + (f"\n{extra}\n" if extra else "")
        + f"\nThis message is sent once a day at most for each program and address.\n"
        f"-- \npostkeep on {hostname}\n"
    )


def notice_message(text: str, *, address: str, hostname: str, when: datetime) -> bytes:
    domain = address.rpartition("@")[2] or hostname
    head = (
        f"From: Mail server <postmaster@{domain}>\r\n"
        f"To: <{address}>\r\n"
        "Subject: Your mail password was sent unencrypted: change your mail program's "
        "settings\r\n"
        f"Date: {format_datetime(when)}\r\n"
        f"Message-ID: {make_msgid(domain=hostname)}\r\n"
        "Auto-Submitted: auto-generated\r\n"  # RFC 3834 §5: no auto-replies to it
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    )
    return head.encode() + text.replace("\n", "\r\n").encode("utf-8")


class PlaintextLeaks:
    """Checks credentials refused before TLS; marks and tells when they were right."""

    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        ingest: Ingest,
        *,
        hostname: str,
        ports: Callable[[], Ports],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        notify_every: timedelta = NOTIFY_EVERY,
    ) -> None:
        self._store = store
        self._auth = auth
        self._ingest = ingest
        self._hostname = hostname
        self._ports = ports
        self._clock = clock
        self._notify_every = notify_every

    async def check(self, creds: Credentials, peer_ip: str, service: Service) -> bool:
        """True if ``creds`` were right (the account is now marked exposed)."""
        if service not in _WHAT:
            return False
        address = await self._auth.verify_plaintext(creds.authcid, creds.password, peer_ip)
        if address is None:
            return False
        when = self._clock()
        try:
            async with self._store.write() as tx:
                due = await tx.record_exposure(
                    address, peer_ip, service.value, when, self._notify_every
                )
        except StorageError as exc:
            logger.error("auth.exposed.not_recorded", extra={"user": address,
                                                             "kind": exc.kind.name})
            return True
        logger.warning("auth.password.exposed", extra={
            "user": address, "service": service.value, "notice": due,
            "policy": self._auth.exposed_policy})
        if due:
            await self._notify(address, peer_ip, service, when)
        return True

    async def _notify(self, address: str, peer_ip: str, service: Service,
                      when: datetime) -> None:
        text = notice_text(address=address, hostname=self._hostname, peer_ip=peer_ip,
                           service=service, when=when, ports=self._ports(),
                           policy=self._auth.exposed_policy)
        body = notice_message(text, address=address, hostname=self._hostname, when=when)
        resolution = await self._ingest.resolve(address)
        if resolution.disposition is not Disposition.LOCAL:
            return
        env = Envelope(
            sender="",  # RFC 5321 §4.5.5: the null reverse-path; nobody to bounce to
            helo=self._hostname,
            peer_ip="127.0.0.1",
            tls=None,
            authenticated=False,
            smtputf8=not address.isascii(),
            recipients=[(address, resolution)],
        )
        try:
            await self._ingest.accept(env, io.BytesIO(body), len(body))
        except StorageError as exc:
            logger.error("auth.exposed.notice_failed", extra={"user": address,
                                                              "kind": exc.kind.name})
