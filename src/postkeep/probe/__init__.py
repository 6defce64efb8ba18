"""``postkeep probe``: how a mail server's ports really behave, and what to type where.

A client-side check that needs no configuration file. For each of the seven mail ports
it finds the mode that works (implicit TLS, STARTTLS/STLS, plaintext), the TLS versions
accepted, the certificate's validity, whether a password could cross the wire before TLS
and (``--active``) whether STARTTLS can be injected into; judges each port secure, weak,
insecure or closed; and says which server, port and security word to enter in Thunderbird,
Outlook, Apple Mail and K-9/Thunderbird for Android.

Modules: ``wire`` (the client connection), ``smtp`` (a minimal SMTP exchange),
``dialogue`` (the same questions in SMTP, IMAP, POP3), ``checks`` (the probe and the
verdict rules), ``settings`` (mail-program settings, autoconfig XML), ``discovery`` (DNS),
``report`` (table and the JSON schema). Python API::

    from postkeep.probe import Options, probe, default_ports
    result = asyncio.run(probe("mail.example.com", default_ports(), Options(timeout=5)))

Invariants:
- No real credential is ever sent; without ``active``, no login is attempted at all.
- Every network step has a timeout, and concurrency is bounded (``Options.concurrency``).
- Only ports judged secure are recommended to people.
"""

from postkeep.probe.checks import (
    Options,
    PortReport,
    ProbeResult,
    default_ports,
    exit_code,
    judge,
    overall,
    probe,
)

__all__ = [
    "Options",
    "PortReport",
    "ProbeResult",
    "default_ports",
    "exit_code",
    "judge",
    "overall",
    "probe",
]
