"""The probe's output: a table for people (``rich``) and JSON for programs.

JSON schema ``postkeep-probe/1`` (stable: fields are only ever added; a change of meaning
gets a new schema name)::

    {
      "schema": "postkeep-probe/1",
      "host": "mail.example.com",            # as given on the command line
      "started": "2025-01-01T12:00:00+00:00",
      "active": false,                       # --active: fake login and injection tests ran
      "verdict": "secure",                   # worst of the open ports: secure|weak|insecure;
                                             # "closed" when no port answered
      "exit_code": 0,                        # 0 all open ports secure; 1 otherwise
      "ports": [
        {
          "service": "imaps",                # smtp submissions submission imaps imap pop3s pop3
          "port": 993,
          "expected_mode": "implicit_tls",   # implicit_tls (465/993/995) | starttls
          "reachable": true,                 # a TCP connection was accepted
          "mode": "implicit_tls",            # implicit_tls | starttls | plaintext | null
          "greeting": "* OK [CAPABILITY …] …",
          "error": null,                     # why nothing worked, when mode is null
          "tls": null | {
            "versions": {"TLSv1": "refused", "TLSv1.1": "refused",
                         "TLSv1.2": "accepted", "TLSv1.3": "accepted"},
                                             # accepted | refused | not_testable | error
            "version": "TLSv1.3",            # negotiated with a default client offer
            "cipher": "TLS_AES_256_GCM_SHA384",
            "bits": 256,
            "certificate": null | {
              "subject": "…", "issuer": "…", "names": ["mail.example.com"],
              "not_before": "…", "not_after": "…", "days_left": 80, "expired": false,
              "key_type": "RSA", "key_bits": 2048, "key": "RSA 2048",
              "fingerprint": "AB:CD:…", "self_signed": false,
              "name_matches": true,          # RFC 7817 §3 check against "host"
              "trusted": true,               # chain verified (system CAs or --ca); null: untested
              "verify_error": null
            }
          },
          "credentials": {
            "before_tls": null | {"starttls": true, "auth": [], "login_disabled": true,
                                  "user": null, "capabilities": ["…"]},
            "after_tls": null | {…same…},    # login_disabled: IMAP only; user: POP3 only
            "exposed": ["AUTH PLAIN LOGIN offered before STARTTLS"],
            "login_attempt": null | {"outcome": "refused", "reply": "530 5.7.0 …"}
                                             # --active; refused | rejected | accepted |
                                             # unavailable | error
          },
          "implicit_tls_also": null | true,  # 587/143/110 found speaking STARTTLS: a
                                             # handshake from the first byte works too
                                             # (false: tried, refused; null: not tried)
          "starttls": {
            "offered": true,                 # null on implicit-TLS ports
            "plaintext_after_go_ahead": 0,   # bytes the server sent after its go-ahead
            "injection": null | {"vulnerable": false, "reply": "", "dropped": 0,
                                 "error": null}               # --active
          },
          "verdict": "secure",               # secure | weak | insecure | closed
          "reasons": [],                     # why weak/insecure, one sentence each
          "notes": []                        # informative, no effect on the verdict
        }
      ],
      "settings": {                          # secure ports only, best first
        "incoming": [{"protocol": "IMAP", "server": "…", "port": 993, "service": "imaps",
                      "security": "SSL/TLS",
                      "implicit_tls_also": false,   # a STARTTLS port where SSL/TLS works too
                      "words": {"Thunderbird": "SSL/TLS", "Outlook": "SSL/TLS",
                                "Apple Mail": "on",
                                "K-9 Mail / Thunderbird for Android": "SSL/TLS"}}],
        "outgoing": [ … ]
      },
      "dns": null | {
        "domain": "example.com", "nameserver": "system" | "IP:PORT", "error": null,
        "mx": [{"preference": 10, "host": "mail.example.com"}],
        "srv": {"_submissions._tcp": [{"priority": 0, "weight": 1, "port": 465,
                                       "target": "mail.example.com"}], …},
        "mta_sts": "v=STSv1; id=…" | null,
        "autoconfig": {"url": "https://autoconfig.example.com/mail/config-v1.1.xml",
                       "result": "HTTP 200" | "does not resolve" | …}
      }
    }

Invariants:
- ``to_json`` and ``render`` read the same ``ProbeResult``; neither probes anything.
- Every key of the schema above is always present (null when not applicable).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from postkeep.probe.checks import (
    OLD_VERSIONS,
    PortReport,
    ProbeResult,
    exit_code,
    exposure,
    overall,
)
from postkeep.probe.dialogue import Offer
from postkeep.probe.discovery import DnsFindings
from postkeep.probe.settings import CLIENT_WORDS, recommend

SCHEMA = "postkeep-probe/1"

_COLOURS = {"secure": "green", "weak": "yellow", "insecure": "red", "closed": "dim"}
_MODE_WORDS = {
    "implicit_tls": "SSL/TLS (implicit)",
    "starttls": "STARTTLS",
    "plaintext": "plaintext only",
}


def _offer(offer: Offer | None) -> dict[str, Any] | None:
    if offer is None:
        return None
    return {
        "starttls": offer.starttls,
        "auth": list(offer.auth),
        "login_disabled": offer.login_disabled,
        "user": offer.user,
        "capabilities": list(offer.raw),
    }


def _port(rep: PortReport) -> dict[str, Any]:
    tls: dict[str, Any] | None = None
    if rep.tls is not None:
        cert = rep.tls.certificate
        tls = {
            "versions": dict(rep.tls.versions),
            "version": rep.tls.version,
            "cipher": rep.tls.cipher,
            "bits": rep.tls.bits,
            "certificate": None
            if cert is None
            else {
                "subject": cert.subject,
                "issuer": cert.issuer,
                "names": list(cert.names),
                "not_before": cert.not_before,
                "not_after": cert.not_after,
                "days_left": cert.days_left,
                "expired": cert.expired,
                "key_type": cert.key_type,
                "key_bits": cert.key_bits,
                "key": cert.key,
                "fingerprint": cert.fingerprint,
                "self_signed": cert.self_signed,
                "name_matches": cert.name_matches,
                "trusted": cert.trusted,
                "verify_error": cert.verify_error,
            },
        }
    login = rep.login_attempt
    inj = rep.injection
    return {
        "service": rep.service.value,
        "port": rep.port,
        "expected_mode": rep.expected_mode,
        "reachable": rep.reachable,
        "mode": rep.mode,
        "greeting": rep.greeting,
        "error": rep.error,
        "tls": tls,
        "credentials": {
            "before_tls": _offer(rep.before_tls),
            "after_tls": _offer(rep.after_tls),
            "exposed": exposure(rep),
            "login_attempt": None
            if login is None
            else {"outcome": login.outcome, "reply": login.reply},
        },
        "starttls": {
            "offered": None if rep.before_tls is None else rep.before_tls.starttls,
            "plaintext_after_go_ahead": rep.plaintext_after_go_ahead,
            "injection": None
            if inj is None
            else {
                "vulnerable": inj.vulnerable,
                "reply": inj.reply,
                "dropped": inj.dropped,
                "error": inj.error,
            },
        },
        "implicit_tls_also": rep.implicit_tls_also,
        "verdict": rep.verdict,
        "reasons": list(rep.reasons),
        "notes": list(rep.notes),
    }


def _dns(found: DnsFindings | None) -> dict[str, Any] | None:
    if found is None:
        return None
    return {
        "domain": found.domain,
        "nameserver": found.nameserver,
        "error": found.error,
        "mx": [{"preference": p, "host": h} for p, h in found.mx],
        "srv": {
            label: [
                {"priority": s.priority, "weight": s.weight, "port": s.port, "target": s.target}
                for s in rows
            ]
            for label, rows in found.srv.items()
        },
        "mta_sts": found.mta_sts,
        "autoconfig": {"url": found.autoconfig_url, "result": found.autoconfig},
    }


def to_dict(result: ProbeResult) -> dict[str, Any]:
    choices = recommend(result)
    dns = result.dns if isinstance(result.dns, DnsFindings) else None
    return {
        "schema": SCHEMA,
        "host": result.host,
        "started": result.started,
        "active": result.active,
        "verdict": overall(result),
        "exit_code": exit_code(result),
        "ports": [_port(p) for p in result.ports],
        "settings": {
            direction: [
                {
                    "protocol": s.protocol,
                    "server": s.server,
                    "port": s.port,
                    "service": s.service.value,
                    "security": s.security,
                    "implicit_tls_also": s.implicit_also,
                    "words": {program: s.word(program) for program in CLIENT_WORDS},
                }
                for s in rows
            ]
            for direction, rows in choices.items()
        },
        "dns": _dns(dns),
    }


def to_json(result: ProbeResult) -> str:
    return json.dumps(to_dict(result), indent=2, ensure_ascii=False)


# -- the table -----------------------------------------------------------------------------
def _versions_cell(rep: PortReport) -> Text:
    """Accepted versions ("1.2 1.3"); old ones on submission/access ports in yellow."""
    text = Text()
    if rep.tls is None:
        return text
    for name, outcome in rep.tls.versions.items():
        short = "1.0" if name == "TLSv1" else name.replace("TLSv", "")
        if outcome == "accepted":
            old = name in OLD_VERSIONS and rep.service.value != "smtp"
            text.append(f"{short} ", style="bold yellow" if old else "green")
        elif outcome == "not_testable":
            text.append(f"({short}?) ", style="dim")
    return text


def _cert_cell(rep: PortReport) -> str:
    cert = rep.tls.certificate if rep.tls else None
    if cert is None:
        return ""
    trust = {True: "trusted", False: "untrusted", None: "unverified"}[cert.trusted]
    name = "name ok" if cert.name_matches else "NAME MISMATCH"
    days = f"expired {-cert.days_left}d ago" if cert.expired else f"{cert.days_left}d left"
    return f"{trust}, {name}, {days}, {cert.key}"


def render(result: ProbeResult, console: Console) -> None:
    table = Table(title=f"postkeep probe {result.host}", title_justify="left")
    for column in ("port", "service", "mode", "TLS accepted", "negotiated", "certificate",
                   "verdict"):
        table.add_column(column)
    for rep in result.ports:
        colour = _COLOURS[rep.verdict]
        table.add_row(
            str(rep.port),
            rep.service.value,
            _MODE_WORDS.get(rep.mode or "", "closed" if not rep.reachable else "?"),
            _versions_cell(rep),
            f"{rep.tls.version} {rep.tls.cipher}" if rep.tls and rep.tls.cipher else "",
            _cert_cell(rep),
            Text(rep.verdict, style=f"bold {colour}"),
        )
    console.print(table)
    for rep in result.ports:
        for reason in rep.reasons:
            console.print(f"  [{_COLOURS[rep.verdict]}]{rep.port} {rep.service.value}:[/] {reason}",
                          highlight=False)
        for note in rep.notes:
            console.print(f"  [dim]{rep.port} {rep.service.value}: {note}[/]", highlight=False)

    dns = result.dns if isinstance(result.dns, DnsFindings) else None
    if dns is not None:
        console.print(f"\n[bold]DNS for {dns.domain}[/] (via {dns.nameserver})", highlight=False)
        if dns.error:
            console.print(f"  {dns.error}", highlight=False)
        else:
            mx = ", ".join(f"{h} ({p})" for p, h in dns.mx) or "none"
            console.print(f"  MX: {mx}", highlight=False)
            for label, records in dns.srv.items():
                value = ", ".join(f"{s.target}:{s.port}" for s in records) or "none"
                console.print(f"  {label}: {value}", highlight=False)
            console.print(f"  _mta-sts TXT: {dns.mta_sts or 'none'}", highlight=False)
            console.print(f"  autoconfig: {dns.autoconfig} ({dns.autoconfig_url})",
                          highlight=False)

    console.print("\n[bold]Settings for your mail program[/]")
    choices = recommend(result)
    for direction, label in (("incoming", "Incoming"), ("outgoing", "Outgoing")):
        rows = choices[direction]
        if not rows:
            console.print(f"  {label}: no secure port found — do not use this server for "
                          f"{'reading' if direction == 'incoming' else 'sending'} mail yet",
                          highlight=False)
            continue
        best = rows[0]
        console.print(
            f"  {label} ({best.protocol}): server {best.server}, port {best.port}, "
            f"security {best.security}",
            highlight=False,
        )
        for program, (setting, _, _) in CLIENT_WORDS.items():
            console.print(f"    {program}: {setting} = {best.word(program)}", highlight=False)
        if best.implicit_also:
            console.print(f"    (SSL/TLS works on port {best.port} too)", highlight=False)
        for alt in rows[1:]:
            either = " or SSL/TLS (either works there)" if alt.implicit_also else ""
            console.print(
                f"    also secure: {alt.protocol} port {alt.port} with {alt.security}{either}",
                highlight=False,
            )
    verdict = overall(result)
    console.print(f"\nOverall: [bold {_COLOURS[verdict]}]{verdict}[/]")
