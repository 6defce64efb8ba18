"""``postkeep domain|user|alias``: accounts live in the store, so every node sees them.

``postkeep domain add D`` also makes D's two DKIM keys (``mail/dkim.py``): they live in the
store too, so every node signs with the same keys. ``postkeep domain dns D`` prints every
DNS record D needs, as zone-file lines built from this node's configuration (host name,
the listeners really open and their ports, the certificate) and D's DKIM keys:

==========================  ======  ====================================================
name                        type    value, and why
==========================  ======  ====================================================
D                           MX      ``10 <hostname>.``: mail for D comes here
D                           TXT     ``v=spf1 mx -all``: only D's MX sends D's mail
                                    (RFC 7208); postkeep sends from the host it
                                    receives on
``_dmarc.D``                TXT     ``v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@D``
                                    (RFC 7489). Quarantine, not reject: forged mail goes
                                    to spam, and a legitimate sender forgotten in SPF/DKIM
                                    (a newsletter service) costs a spam folder, not
                                    bounces. Raise to ``p=reject`` once the reports are
                                    clean.
``<sel>._domainkey.D``      TXT     one per DKIM key (``v=DKIM1; k=…; p=…``)
``_mta-sts.D``              TXT     ``v=STSv1; id=…`` (RFC 8461 §3.1); the id is a hash
                                    of the policy the http listener serves, so it changes
                                    exactly when the policy does (mode follows the
                                    certificate)
``_smtp._tls.D``            TXT     ``v=TLSRPTv1; rua=mailto:tls-reports@D`` (RFC 8460)
``_submissions._tcp.D`` …   SRV     RFC 6186 and RFC 8314 §5.1: the configured port of
                                    each service, ``0 0 0 .`` when it is switched off
==========================  ======  ====================================================

Hints that are not records of D's zone (the host's A/AAAA and PTR, the HELO SPF record,
the autoconfig/autodiscover/mta-sts names the http listener answers) are printed as
comments.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from postkeep.auth.passwords import generate_password, hash_password
from postkeep.cli.common import CliError, config_from, read_password, with_store
from postkeep.config.schema import Config, Service
from postkeep.mail import address as addr
from postkeep.mail import dkim
from postkeep.store.api import Exposure, Store
from postkeep.tls.certs import CertError, load_pair
from postkeep.web import mta_sts


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    domain = sub.add_parser("domain", parents=[common], help="mail domains").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, helptext in (
        ("add", "serve a domain (and create its DKIM keys)"),
        ("del", "stop serving a domain"),
        ("dns", "print the DNS records the domain needs"),
    ):
        p = domain.add_parser(action, parents=[common], help=helptext)
        p.add_argument("domain")
        p.set_defaults(run=domain_cmd)
    domain.add_parser("list", parents=[common], help="list domains").set_defaults(run=domain_cmd)

    user = sub.add_parser("user", parents=[common], help="accounts").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, helptext in (("add", "create an account"), ("passwd", "set a new password")):
        p = user.add_parser(action, parents=[common], help=helptext)
        p.add_argument("address")
        how = p.add_mutually_exclusive_group()
        how.add_argument("--password-stdin", action="store_true",
                         help="read the password from the first line of standard input")
        how.add_argument("--generate-password", action="store_true",
                         help="generate a password and print it once")
        p.set_defaults(run=user_cmd)
    p = user.add_parser("del", parents=[common], help="delete an account and its mail")
    p.add_argument("address")
    p.set_defaults(run=user_cmd)
    p = user.add_parser("unlock", parents=[common],
                        help="clear the 'password exposed' mark (auth/exposure.py) "
                             "without a new password")
    p.add_argument("address")
    p.set_defaults(run=user_cmd)
    p = user.add_parser("list", parents=[common],
                        help="list accounts; 'exposed …' marks a password sent before TLS")
    p.add_argument("domain", nargs="?")
    p.set_defaults(run=user_cmd)

    alias = sub.add_parser("alias", parents=[common], help="aliases").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, helptext in (("add", "deliver SOURCE to TARGET too"), ("del", "remove an alias")):
        p = alias.add_parser(action, parents=[common], help=helptext)
        p.add_argument("source", help="an address, or @domain for the domain's catch-all")
        p.add_argument("target", help="an address, local or remote")
        p.set_defaults(run=alias_cmd)
    p = alias.add_parser("list", parents=[common], help="list aliases")
    p.add_argument("source", nargs="?")
    p.set_defaults(run=alias_cmd)


def _address(text: str) -> str:
    try:
        addr.split_address(text)
    except addr.AddressError as exc:
        raise CliError(f"{text!r} is not an address of the form user@domain", code=2) from exc
    return text.lower()


def _domain(text: str) -> str:
    try:
        return addr.normalize_domain(text.strip().rstrip("."))
    except addr.AddressError as exc:
        raise CliError(f"{text!r} is not a domain name", code=2) from exc


def domain_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)
    if args.action == "dns":
        return domain_dns(config, _domain(args.domain))
    name = args.domain.lower() if args.action != "list" else ""
    # Made before the transaction: RSA key generation takes a moment, and the writer
    # should not wait for it.
    keys = dkim.generate_pair() if args.action == "add" else ()
    added: list[str] = []

    async def act(store: Store) -> None:
        if args.action == "list":
            async with store.read() as tx:
                for d in await tx.list_domains():
                    print(d.name)
            return
        async with store.write() as tx:
            if args.action == "add":
                if await tx.domain_exists(name):
                    # A domain made without keys (postkeep init, or before DKIM existed)
                    # gets them now; one that has keys is a mistake to report.
                    if await tx.dkim_keys(name):
                        raise CliError(f"domain {name} already exists")
                    added.append("keys")
                else:
                    await tx.add_domain(name)
                for key in keys:
                    await tx.add_dkim_key(name, key.selector, key.algorithm, key.private_pem,
                                          key.public_txt)
            else:
                await tx.del_domain(name)

    with_store(config, act)
    if args.action == "add":
        selectors = ", ".join(k.selector for k in keys)
        what = "created the DKIM keys of" if added else "added"
        print(f"{what} {name} (DKIM selectors {selectors})")
        print(f"next: publish its DNS records, see postkeep domain dns {name}")
    return 0


def domain_dns(config: Config, domain: str) -> int:
    """``postkeep domain dns DOMAIN``: the zone-file lines, from the store and this config."""
    policy, notes = mta_sts_policy(config)

    async def read(store: Store) -> tuple[list[dkim.SigningKey], list[str]]:
        async with store.read() as tx:
            if not await tx.domain_exists(domain):
                raise CliError(f"{domain} is not a domain served here "
                               f"(postkeep domain add {domain})")
            keys: list[dkim.SigningKey] = list(await tx.dkim_keys(domain))
            missing = []
            for local in (DMARC_REPORTS, TLS_REPORTS):
                address = f"{local}@{domain}"
                if (await tx.get_account(address) is None
                        and not await tx.alias_targets(address)
                        and not await tx.alias_targets(f"@{domain}")):
                    missing.append(address)
            return keys, missing

    keys, missing = with_store(config, read)
    if not keys:
        notes.append(f"{domain} has no DKIM keys: postkeep domain add {domain} creates them")
    try:
        records = dns_records(config, domain, keys, mta_sts_policy=policy)
    except dkim.DkimError as exc:
        raise CliError(f"a DKIM key of {domain} cannot be read: {exc}") from exc
    hints = dns_hints(config, domain, missing_reports=missing, notes=notes)
    print(render_zone(domain, records, hints), end="")
    return 0


def user_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)
    password = hashed = ""
    if args.action in ("add", "passwd"):
        address = _address(args.address)
        password = generate_password() if args.generate_password else read_password(args)
        hashed = hash_password(password)

    async def act(store: Store) -> None:
        if args.action == "list":
            async with store.read() as tx:
                accounts = await tx.list_accounts(args.domain)
                exposed: dict[str, Exposure] = {}
                for row in await tx.exposures():  # most recent first
                    exposed.setdefault(row.address, row)
            for account in accounts:
                e = exposed.get(account.address)
                if e is None:
                    print(account.address)
                else:
                    # A correct password sent before TLS (the most recent time); cleared
                    # by "user passwd" or "user unlock".
                    when = e.last_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                    print(f"{account.address}  exposed {when} from {e.peer} ({e.service})")
            return
        async with store.write() as tx:
            if args.action == "add":
                await tx.add_account(address, hashed)
            elif args.action == "passwd":
                await tx.set_password(address, hashed)  # also clears "exposed"
            elif args.action == "unlock":
                cleared = await tx.clear_exposures(_address(args.address))
                print(f"{_address(args.address)}: "
                      + ("unlocked" if cleared else "was not marked exposed"))
            else:
                await tx.del_account(_address(args.address))

    with_store(config, act)
    if args.action in ("add", "passwd") and args.generate_password:
        print(f"password for {address}: {password}")
        print("(shown once; change it with 'postkeep user passwd')")
    return 0


def alias_cmd(args: argparse.Namespace) -> int:
    config = config_from(args)

    async def act(store: Store) -> None:
        if args.action == "list":
            async with store.read() as tx:
                for alias in await tx.list_aliases(args.source):
                    print(f"{alias.source} -> {alias.target}")
            return
        source = args.source.lower()
        if not source.startswith("@"):
            source = _address(source)
        target = _address(args.target)
        async with store.write() as tx:
            if args.action == "add":
                await tx.add_alias(source, target)
            else:
                await tx.del_alias(source, target)

    with_store(config, act)
    return 0


# -- postkeep domain dns ---------------------------------------------------------------
TTL = 3600
#: Where aggregate reports go: DMARC (RFC 7489 §7.2) and TLS-RPT (RFC 8460 §3). Both
#: addresses must take mail: the command says so when neither an account nor an alias
#: (nor the catch-all) receives it.
DMARC_REPORTS = "dmarc-reports"
TLS_REPORTS = "tls-reports"
DMARC_POLICY = "quarantine"
#: RFC 6186 §3 labels, the service behind each and its SRV priority (lower is preferred):
#: implicit TLS before STARTTLS (RFC 8314 §5.1), IMAP before POP3 (RFC 6186 §3.4).
SRV_SERVICES: tuple[tuple[str, Service, int], ...] = (
    ("_submissions._tcp", Service.SUBMISSIONS, 0),
    ("_submission._tcp", Service.SUBMISSION, 10),
    ("_imaps._tcp", Service.IMAPS, 0),
    ("_imap._tcp", Service.IMAP, 10),
    ("_pop3s._tcp", Service.POP3S, 20),
    ("_pop3._tcp", Service.POP3, 30),
)


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record, in zone-file presentation format."""

    name: str  # absolute, ending in "."
    rtype: str  # "MX", "TXT", "SRV"
    data: str  # RDATA as a zone file writes it (TXT: quoted strings)
    comment: str = ""

    def line(self) -> str:
        return f"{self.name:<40} {TTL} IN {self.rtype:<5} {self.data}"


def txt_data(text: str) -> str:
    """RFC 1035 §3.3.14: a TXT record is character-strings of at most 255 octets each;
    a longer text (an RSA-2048 key) is several strings, which readers concatenate
    (RFC 6376 §3.6.2.2, RFC 7208 §3.3)."""
    raw = text.encode("ascii")
    parts = [raw[i : i + 255].decode("ascii") for i in range(0, len(raw), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


def mta_sts_id(policy: str) -> str:
    """RFC 8461 §3.1: ``id`` is 1-32 alphanumerics and must change when the policy does."""
    return hashlib.sha256(policy.encode("utf-8")).hexdigest()[:20]


def dns_records(
    config: Config, domain: str, keys: Sequence[dkim.SigningKey], *,
    mta_sts_policy: str | None,
) -> list[Record]:
    """Every record ``domain`` needs for this node's configuration.

    ``mta_sts_policy`` is the policy text the http listener serves, None when nothing
    serves it (the http listener is off): then no ``_mta-sts`` record is given, since
    announcing a policy that cannot be fetched only costs senders a failed fetch.
    """
    d = domain.rstrip(".").lower()
    host = config.hostname.rstrip(".").lower() + "."
    records = [
        Record(f"{d}.", "MX", f"10 {host}", "mail for the domain comes to this server"),
        Record(f"{d}.", "TXT", txt_data("v=spf1 mx -all"),
               "SPF (RFC 7208): only the domain's MX sends its mail"),
        Record(f"_dmarc.{d}.", "TXT",
               txt_data(f"v=DMARC1; p={DMARC_POLICY}; rua=mailto:{DMARC_REPORTS}@{d}"),
               "DMARC (RFC 7489): unaligned mail goes to spam; reports to "
               f"{DMARC_REPORTS}@{d}"),
    ]
    for key in sorted(keys, key=lambda k: (list(dkim.ALGORITHMS).index(k.algorithm)
                                           if k.algorithm in dkim.ALGORITHMS else 9,
                                           k.selector)):
        records.append(Record(
            dkim.record_name(key.selector, d) + ".", "TXT", txt_data(dkim.dns_txt(key)),
            f"DKIM {key.algorithm} key (selector {key.selector})"))
    if mta_sts_policy is not None:
        records.append(Record(
            f"_mta-sts.{d}.", "TXT", txt_data(f"v=STSv1; id={mta_sts_id(mta_sts_policy)}"),
            "MTA-STS (RFC 8461): the policy at https://mta-sts." + d
            + "/.well-known/mta-sts.txt"))
    records.append(Record(
        f"_smtp._tls.{d}.", "TXT", txt_data(f"v=TLSRPTv1; rua=mailto:{TLS_REPORTS}@{d}"),
        f"TLS-RPT (RFC 8460): TLS failure reports to {TLS_REPORTS}@{d}"))
    for label, service, priority in SRV_SERVICES:
        addresses = config.enabled(service)
        if addresses:
            records.append(Record(f"{label}.{d}.", "SRV",
                                  f"{priority} 0 {addresses[0].port} {host}",
                                  f"RFC 6186: {service.value}"))
        else:
            # RFC 6186 §3.4 / RFC 2782: target "." says the service is not offered.
            records.append(Record(f"{label}.{d}.", "SRV", "0 0 0 .",
                                  f"RFC 6186: {service.value} is switched off"))
    return records


def dns_hints(config: Config, domain: str, *, missing_reports: Sequence[str] = (),
              notes: Sequence[str] = ()) -> list[str]:
    """Comment lines: what else to set up that is not a record of the domain's zone."""
    d = domain.rstrip(".").lower()
    host = config.hostname.rstrip(".").lower()
    hints = [
        f"{host}. A/AAAA: this server's public addresses; their PTR records should name "
        f"{host}",
        f'{host}. TXT "v=spf1 a -all": SPF for the HELO name (RFC 7208 §2.3)',
    ]
    if config.enabled(Service.HTTP):
        hints.append(
            f"autoconfig.{d}., autodiscover.{d}. and mta-sts.{d}. CNAME {host}.: HTTPS "
            "(443) to them through the reverse proxy in front of the http listener")
    else:
        hints.append("the http listener is off: no autoconfig, autodiscover or MTA-STS "
                     "policy is served, so no _mta-sts record is given")
    if config.outbound.relay:
        hints.append(f"mail leaves through the relay {config.outbound.relay}: add its "
                     "SPF mechanism (include:…) before -all")
    for address in missing_reports:
        hints.append(f"{address} does not receive mail yet: add an account or an alias "
                     f"(postkeep alias add {address} YOU@{d})")
    hints.extend(notes)
    return hints


def render_zone(domain: str, records: Sequence[Record], hints: Sequence[str]) -> str:
    lines = [f"; DNS records for {domain} (postkeep domain dns {domain})", ";"]
    for record in records:
        if record.comment:
            lines.append(f"; {record.comment}")
        lines.append(record.line())
    lines.append(";")
    lines.extend(f"; {hint}" for hint in hints)
    return "\n".join(lines) + "\n"


def mta_sts_policy(config: Config) -> tuple[str | None, list[str]]:
    """The policy text the http listener serves (None when it is off), and notes."""
    if not config.enabled(Service.HTTP):
        return None, []
    notes: list[str] = []
    try:
        mode = mta_sts.policy_mode(load_pair(config.tls.cert, config.tls.key), config.hostname)
    except CertError as exc:
        mode = "testing"
        notes.append(f"the certificate could not be read ({exc}): the MTA-STS id assumes "
                     "mode testing")
    if mode == "testing":
        notes.append("MTA-STS is in mode testing until a CA-issued certificate for "
                     f"{config.hostname} is installed; run this again then (the id changes)")
    return mta_sts.policy_text(mode=mode, mx=config.hostname), notes
