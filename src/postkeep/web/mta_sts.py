"""The MTA-STS policy this server publishes (RFC 8461 §3.2), as ``/.well-known/mta-sts.txt``.

Senders fetch it from ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461
§3.3): the ``http`` listener is plain HTTP, so publishing the policy needs the reverse
proxy in front of it to serve that name over HTTPS with a publicly trusted certificate,
and a ``_mta-sts.<domain>`` TXT record (``v=STSv1; id=…``) announcing it (§3.1).

The mode is chosen from the certificate being served, because "enforce" tells every
sender to refuse delivery to an MX whose certificate does not validate (§5):

- ``enforce`` when the certificate is CA-issued (not self-signed), names the MX host
  name (RFC 8461 §4.1 via RFC 6125) and has not expired;
- ``testing`` otherwise, e.g. on a fresh install with the self-signed certificate from
  ``postkeep init``: senders still deliver and report failures (TLS-RPT, RFC 8460), so a
  certificate mistake costs reports, not mail.

Whether the issuing CA is one senders trust cannot be known from here; replacing the
self-signed certificate with a private-CA one should be done with that in mind.

Invariants:
- The policy names only this server's host name as ``mx`` (one MX: postkeep itself).
- The text is exactly the RFC 8461 §3.2 grammar: ``key: value`` lines ending in CRLF.
"""

from __future__ import annotations

import datetime as dt

from postkeep.tls.certs import CertInfo

#: RFC 8461 §3.2: max_age is in seconds, up to 31557600; one week is the common choice
#: (long enough to protect, short enough to change a mistake).
MAX_AGE = 604_800


def policy_mode(cert: CertInfo, hostname: str, now: dt.datetime | None = None) -> str:
    """``"enforce"`` only for a certificate senders can validate for ``hostname``."""
    if cert.self_signed or not cert.covers(hostname):
        return "testing"
    if cert.expires_in(now) <= dt.timedelta(0):
        return "testing"
    return "enforce"


def policy_text(*, mode: str, mx: str, max_age: int = MAX_AGE) -> str:
    """The policy body (RFC 8461 §3.2); ``version`` must come first."""
    if mode not in ("enforce", "testing", "none"):
        raise ValueError(f"unknown MTA-STS mode {mode!r}")
    lines = ["version: STSv1", f"mode: {mode}", f"mx: {mx.rstrip('.').lower()}",
             f"max_age: {max_age}"]
    return "".join(f"{line}\r\n" for line in lines)
