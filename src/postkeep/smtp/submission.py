"""Ports 587 and 465: mail from this server's own users.

Invariants:
- AUTH happens only over TLS (the core refuses it before STARTTLS) and MAIL only after AUTH.
- An authenticated user sends only as their own address or as an alias that leads to
  them (553 5.7.1 otherwise): no forged senders from our own users.
- Failed logins are throttled by ``auth.service``; the reply never says whether the
  account exists.
"""

from __future__ import annotations

from postkeep import log
from postkeep.auth.service import Authenticator, Outcome
from postkeep.ingest import Disposition, Ingest, Resolution
from postkeep.net.listener import ConnInfo
from postkeep.net.stream import Stream
from postkeep.sasl.mechanisms import Challenge, Mechanism, SaslError, server_mechanism
from postkeep.smtp import replies
from postkeep.smtp.protocol import AuthResponse, AuthStart, SmtpServer
from postkeep.smtp.replies import Reply, reply
from postkeep.smtp.session import SmtpSession, local_refusal

logger = log.get_logger("smtp")

THROTTLED = reply(454, "4.7.0", "Too many failed logins, please try again later")
AUTH_CANCELLED = reply(501, "5.7.0", "Authentication cancelled")
# The password was right, but it was sent before TLS ([security] exposed_password,
# auth/exposure.py). RFC 5248 registers 5.7.13 "User Account Disabled" with 525 (RFC 4954
# §6 lists 535 for wrong credentials, which would make programs ask for the password
# again rather than show the sentence).
MUST_CHANGE = reply(
    525, "5.7.13",
    "Your password was sent unencrypted and must be changed: ask your administrator "
    "for a new one (postkeep user passwd)",
)
LOCKED = reply(
    525, "5.7.13",
    "Your account is locked because its password was sent unencrypted: ask your "
    "administrator to unlock it",
)
NOT_YOUR_ADDRESS = "You may only send as {user} or one of its aliases"


class SubmissionSession(SmtpSession):
    def __init__(
        self, *, core: SmtpServer, info: ConnInfo, stream: Stream, ingest: Ingest,
        auth: Authenticator,
    ) -> None:
        super().__init__(core=core, info=info, stream=stream, ingest=ingest)
        self._auth = auth
        self._mechanism: Mechanism | None = None

    async def auth(self, event: AuthStart | AuthResponse) -> Reply:
        try:
            if isinstance(event, AuthStart):
                try:
                    self._mechanism = server_mechanism(event.mechanism)
                except (KeyError, SaslError):
                    return reply(504, "5.5.4", "Unrecognized authentication mechanism")
                step = self._mechanism.start(event.initial)
            else:
                if event.data is None or self._mechanism is None:
                    self._mechanism = None
                    return AUTH_CANCELLED  # RFC 4954 §4: "*" cancels
                step = self._mechanism.step(event.data)
        except SaslError as exc:
            self._mechanism = None
            return reply(501, "5.5.2", f"Malformed authentication data: {exc}")
        if isinstance(step, Challenge):
            return replies.auth_challenge(step.data)
        self._mechanism = None
        creds = step.credentials
        result = await self._auth.login(creds.authcid, creds.password, self.info.peer_ip)
        if result.outcome is Outcome.THROTTLED:
            return THROTTLED
        if result.outcome is Outcome.MUST_CHANGE:
            return MUST_CHANGE
        if result.outcome is Outcome.LOCKED:
            return LOCKED
        if result.outcome is not Outcome.OK or result.address is None:
            return replies.AUTH_FAILED
        self.user = result.address
        log.bind(user=result.address)
        return replies.AUTH_OK

    async def check_sender(self, sender: str) -> Reply | None:
        assert self.user is not None, "the core refuses MAIL before AUTH on submission"
        if sender.lower() == self.user:
            return None
        if sender:
            res = await self.ingest.resolve(sender)
            if res.disposition is Disposition.LOCAL and self.user in res.accounts:
                return None
        logger.info("smtp.sender.refused", extra={"sender": sender})
        return reply(553, "5.7.1", NOT_YOUR_ADDRESS.format(user=self.user))

    async def check_recipient(self, recipient: str, res: Resolution) -> Reply | None:
        return local_refusal(res)  # remote recipients go to the outbound queue
