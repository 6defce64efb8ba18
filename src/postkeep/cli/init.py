"""``postkeep init``: write a configuration, a certificate if none is given, and the store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from postkeep.cli.common import CliError, with_store
from postkeep.config.load import dev_listeners, load_config, render_config, standard_listeners
from postkeep.mail import dkim
from postkeep.store.api import StorageError, StorageErrorKind, Store
from postkeep.tls.certs import generate_self_signed

CONFIG_NAME = "postkeep.toml"


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common], help="create a configuration and data directory")
    p.add_argument("--dir", type=Path, default=Path("."), help="where to write (default: .)")
    p.add_argument("--hostname", required=True, help="this server's name (EHLO, certificate)")
    p.add_argument("--domain", required=True, help="the first mail domain to serve")
    p.add_argument("--dev-ports", action="store_true",
                   help="listen on 127.0.0.1 and 10000 + each standard port (no root needed)")
    p.add_argument("--cert", type=Path, help="existing certificate chain (PEM)")
    p.add_argument("--key", type=Path, help="existing private key (PEM)")
    p.add_argument("--force", action="store_true", help="overwrite an existing configuration")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    directory: Path = args.dir.resolve()
    config_path = directory / CONFIG_NAME
    if config_path.exists() and not args.force:
        raise CliError(f"{config_path} exists already (use --force to overwrite)")
    if (args.cert is None) != (args.key is None):
        raise CliError("give both --cert and --key, or neither", code=2)
    directory.mkdir(parents=True, exist_ok=True)
    if args.cert is None:
        cert, key = directory / "tls" / "fullchain.pem", directory / "tls" / "privkey.pem"
        cert.parent.mkdir(parents=True, exist_ok=True)
        generate_self_signed(args.hostname, cert, key)
        print(f"wrote a self-signed certificate for {args.hostname}: {cert}")
    else:
        cert, key = args.cert.resolve(), args.key.resolve()
    data_dir = directory / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    listeners = dev_listeners() if args.dev_ports else standard_listeners()
    config_path.write_text(
        render_config(
            hostname=args.hostname, data_dir=data_dir, cert=cert, key=key, listeners=listeners
        )
    )
    config = load_config(config_path)
    domain = args.domain.lower()
    keys = dkim.generate_pair()  # the domain signs its outgoing mail from the start

    async def add_domain(store: Store) -> None:
        async with store.write() as tx:
            try:
                await tx.add_domain(domain)
            except StorageError as exc:
                if exc.kind is not StorageErrorKind.EXISTS:
                    raise
            if not await tx.dkim_keys(domain):
                for key in keys:
                    await tx.add_dkim_key(domain, key.selector, key.algorithm,
                                          key.private_pem, key.public_txt)

    with_store(config, add_domain)
    print(f"wrote {config_path}; serving domain {domain}")
    print(f"next: postkeep --config {config_path} user add USER@{domain}")
    print(f"      postkeep --config {config_path} domain dns {domain}   # DNS records to publish")
    return 0
