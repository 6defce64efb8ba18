"""``postkeep probe HOST``: check a mail server's ports from the outside (no config needed).

Exit codes: 0 every open port is secure; 1 any port is weak or insecure, or none answered;
2 usage error (argparse, a bad ``--ports`` entry, a missing ``--ca`` file).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from postkeep.cli.common import CliError
from postkeep.config.schema import Service
from postkeep.probe import checks, report
from postkeep.probe.discovery import discover
from postkeep.probe.settings import autoconfig_xml


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "probe",
        parents=[common],
        help="check how a mail server's ports behave and what to set in a mail program",
        description="Check each mail port of HOST: the mode that works, TLS versions, "
        "certificate, credential exposure; then print the settings for mail programs.",
    )
    p.add_argument("host", metavar="HOST", help="host name or IP address of the mail server")
    p.add_argument("--port-offset", type=int, default=0, metavar="N",
                   help="add N to every standard port (10000 for 'postkeep init --dev-ports')")
    p.add_argument("--ports", default=None, metavar="SERVICE=PORT,…",
                   help="probe only these services on these ports, e.g. imaps=993,submissions=465")
    p.add_argument("--ca", type=Path, default=None, metavar="FILE",
                   help="also trust the CA certificates in FILE (PEM)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds for each network step (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON (schema postkeep-probe/1)")
    p.add_argument("--active", action="store_true",
                   help="also try a fake login before TLS and STARTTLS command injection")
    p.add_argument("--dns", default=None, metavar="IP:PORT",
                   help="DNS server for MX/SRV/MTA-STS discovery (default: the system's)")
    p.add_argument("--domain", default=None, metavar="DOMAIN",
                   help="mail domain for DNS discovery (default: HOST without its first label)")
    p.add_argument("--autoconfig", type=Path, default=None, metavar="FILE",
                   help="write the Thunderbird config-v1.1.xml the findings imply to FILE")
    p.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="connections open at once (default 8)")
    p.set_defaults(run=run)


def parse_ports(spec: str | None, offset: int) -> dict[Service, int]:
    if not spec:
        return checks.default_ports(offset)
    known = {s.value: s for s in checks.PROBED}
    out: dict[Service, int] = {}
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in known:
            raise CliError(
                f"--ports: {item!r} is not SERVICE=PORT with SERVICE one of {', '.join(known)}",
                code=2,
            )
        try:
            port = int(value)
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise CliError(f"--ports: {value!r} is not a port number", code=2)
        out[known[name]] = port
    return out


def mail_domain(host: str, explicit: str | None) -> str | None:
    """The domain DNS discovery asks about; None for an IP address without --domain."""
    if explicit:
        return explicit.rstrip(".").lower()
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        labels = host.rstrip(".").lower().split(".")
        if len(labels) < 2:
            return None  # "localhost": no mail domain to look up
        return ".".join(labels[1:]) if len(labels) > 2 else ".".join(labels)
    return None


def _check_dns(value: str | None) -> None:
    if value is None:
        return
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise CliError(f"--dns: {value!r} is not IP:PORT (e.g. 127.0.0.1:53)", code=2)


def run(args: argparse.Namespace) -> int:
    ports = parse_ports(args.ports, args.port_offset)
    _check_dns(args.dns)
    if args.ca is not None and not args.ca.is_file():
        raise CliError(f"--ca: {args.ca} is not a file", code=2)
    if args.timeout <= 0 or args.concurrency <= 0:
        raise CliError("--timeout and --concurrency must be positive", code=2)
    options = checks.Options(
        timeout=args.timeout, ca=args.ca, active=args.active, concurrency=args.concurrency
    )
    domain = mail_domain(args.host, args.domain)

    async def go() -> checks.ProbeResult:
        if domain is not None:
            result, found = await asyncio.gather(
                checks.probe(args.host, ports, options),
                discover(domain, nameserver=args.dns, timeout=args.timeout, ca=args.ca),
            )
            result.dns = found
            return result
        return await checks.probe(args.host, ports, options)

    result = asyncio.run(go())
    if args.json:
        sys.stdout.write(report.to_json(result) + "\n")
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=130)  # piped or redirected: no terminal width to fit
        report.render(result, console)
    if args.autoconfig is not None:
        try:
            args.autoconfig.write_text(autoconfig_xml(result, domain))
        except OSError as exc:
            raise CliError(f"--autoconfig: cannot write {args.autoconfig}: {exc.strerror}") from exc
    return checks.exit_code(result)
