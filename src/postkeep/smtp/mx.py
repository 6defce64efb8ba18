"""Port 25: mail from other servers, for local domains only.

Invariants:
- No AUTH here, ever (the core neither advertises nor accepts it on Role.MX).
- A recipient outside the local domains is refused at RCPT (554 5.7.1): port 25 is not a
  relay. An unknown user of a local domain is refused at RCPT (550 5.1.1), so the sending
  server, not us, reports the failure and we never create backscatter.
"""

from __future__ import annotations

from postkeep.ingest import Disposition, Resolution
from postkeep.smtp.replies import Reply, reply
from postkeep.smtp.session import SmtpSession, local_refusal


class MxSession(SmtpSession):
    async def check_recipient(self, recipient: str, res: Resolution) -> Reply | None:
        if res.disposition is Disposition.REMOTE:
            domain = recipient.rpartition("@")[2]
            return reply(
                554, "5.7.1",
                f"Relay access denied: {domain} is not a domain of this server "
                "(to send mail, use the submission port 465 or 587 with a login)",
            )
        return local_refusal(res)
